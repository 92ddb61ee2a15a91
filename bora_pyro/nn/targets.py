r"""Which layers of a causal LM get LoRA factors: PEFT's ``target_modules`` conventions.

``targets`` is one of

- a sequence of names: a module is adapted when its full path equals a name or ends with ``"." + name``
  (``q_proj`` adapts every ``...q_proj``; ``self_attn.q_proj`` only those of self-attention), or, for a name
  ``"re:PATTERN"``, when the full path matches the regular expression PATTERN whole (the CLI's form:
  ``--targets 're:.*\.(q|v)_proj'``); every name must match at least one module;
- ``"all-linear"`` (or the one-name sequence ``("all-linear",)``, as the CLI gives it): every linear layer
  but the output head;
- any other string: a regular expression that the full module path must match whole (``re.fullmatch``);
- ``None`` or empty: the default for the model type (:data:`DEFAULT_TARGETS`).

Only linear layers (``nn.Linear``, GPT-2's ``Conv1D``) can be adapted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

ALL_LINEAR = "all-linear"
Targets = Sequence[str] | str

# Default target modules by Hugging Face ``model_type`` (LoRA paper / PEFT convention: q and v).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """Whether LoRA can adapt ``module`` (a linear layer)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _linear_names(lm: nn.Module) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path, m in lm.named_modules() if is_linear(m)})


def resolve_targets(lm: nn.Module, targets: Targets | None) -> tuple[str, ...] | str:
    """The targets as given (a sequence becomes a tuple), or the default for the model type."""
    if isinstance(targets, str):
        return targets
    if targets:
        return tuple(targets)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    names = set(_linear_names(lm))
    for guess in (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",)):
        if set(guess) <= names:
            return guess
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}; pass targets= (CLI: --targets) "
        f"from the linear layer names it has: {sorted(names)}, or 'all-linear'"
    )


REGEX_PREFIX = "re:"  # a target name that is a regular expression over full module paths


def _suffix_match(path: str, name: str) -> bool:
    """Whether the module path ``path`` is selected by the target name ``name`` (a suffix, or ``re:PATTERN``)."""
    if name.startswith(REGEX_PREFIX):
        return _compiled(name[len(REGEX_PREFIX) :]).fullmatch(path) is not None
    return path == name or path.endswith("." + name)


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"targets {pattern!r} is not a valid regular expression: {error}") from None


def select_layers(lm: nn.Module, targets: tuple[str, ...] | str) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs ``targets`` selects (see the module docstring), in the model's order.
    Raises ValueError naming what matched nothing, or a selected module that is not linear."""
    if not isinstance(targets, str) and ALL_LINEAR in targets and len(targets) > 1:
        raise ValueError(f"targets {list(targets)}: 'all-linear' takes every linear layer and is given alone")
    if targets == ALL_LINEAR or tuple(targets) == (ALL_LINEAR,):
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        chosen = [(p, m) for p, m in lm.named_modules() if is_linear(m) and m is not head]
        if not chosen:
            raise ValueError("targets 'all-linear': the model has no linear layer besides its output head")
        return chosen
    modules = list(lm.named_modules())
    if isinstance(targets, str):
        pattern = _compiled(targets)
        chosen = [(p, m) for p, m in modules if pattern.fullmatch(p)]
        if not chosen:
            example = next((p for p, m in modules if is_linear(m)), "")
            raise ValueError(
                f"targets {targets!r} matches no module path (it must match a whole path, such as {example!r})"
            )
    else:
        chosen = [(p, m) for p, m in modules if p and any(_suffix_match(p, t) for t in targets)]
        missing = [t for t in targets if not any(_suffix_match(p, t) for p, _ in chosen)]
        patterns = [t for t in missing if t.startswith(REGEX_PREFIX)]
        if patterns:
            example = next((p for p, m in modules if is_linear(m)), "")
            raise ValueError(
                f"targets {patterns} match no module path (re:PATTERN must match a whole path, such as {example!r}; "
                "a comma after re: belongs to the pattern)"
            )
        if missing:
            raise ValueError(
                f"target modules {missing} not found in the model; linear layers it has: {_linear_names(lm)} "
                "(a name matches a module path's last components, e.g. q_proj or self_attn.q_proj)"
            )
    for path, module in chosen:
        if not is_linear(module):
            raise ValueError(f"target {path!r} is a {type(module).__name__}, not a linear layer")
    return chosen


def peft_target_modules(lm: nn.Module, paths: Sequence[str]) -> list[str]:
    """``target_modules`` for an exported adapter_config.json that makes PEFT adapt exactly ``paths``: their
    last names when those select nothing else (the usual case), else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})  # [last name of each adapted path]
    wrapped = set(paths)  # adapted already: no longer plain linear layers
    selected = {
        p for p, m in lm.named_modules() if (p in wrapped or is_linear(m)) and any(_suffix_match(p, t) for t in leaves)
    }
    return leaves if selected == wrapped else sorted(paths)
