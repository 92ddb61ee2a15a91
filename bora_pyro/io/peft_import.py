"""Start BoRA from an existing PEFT LoRA adapter: its factors become Theta's (and every task's) start.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (never a pickle). The adapter must
be a plain LoRA of the same rank on the same modules; its scaling (lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA) may differ from ours: B is rescaled so that the weight update
``scaling * B @ A`` is unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..nn.lora import MultiTaskLoRA

UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _is_number(value: object) -> bool:
    """A real number (an int or a float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# key -> (whether the config must have it, the check of its value, what the value must be)
CONFIG_TYPES = {
    "peft_type": (True, lambda v: isinstance(v, str), "a string"),
    "r": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "lora_alpha": (True, lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "use_rslora": (False, lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (False, lambda v: v is None or isinstance(v, bool), "true or false"),
    "lora_bias": (False, lambda v: v is None or isinstance(v, bool), "true or false"),
    "bias": (False, lambda v: isinstance(v, str), "a string"),
    "rank_pattern": (False, lambda v: v is None or isinstance(v, dict), "an object"),
    "alpha_pattern": (False, lambda v: v is None or isinstance(v, dict), "an object"),
    "target_modules": (
        False,
        lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, str) for m in v)),
        "a string or a list of strings",
    ),
}


def _load_config(path: Path) -> dict:
    """``adapter_config.json`` as a dict whose keys have the types PEFT writes, or a ValueError naming it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): not a PEFT adapter config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (a PEFT adapter config), got a {type(config).__name__}")
    for key, (required, valid, what) in CONFIG_TYPES.items():
        if key not in config:
            if required:
                raise ValueError(f"{path} has no {key!r}: not a PEFT adapter config")
        elif not valid(config[key]):
            raise ValueError(f"{path}: {key} must be {what}, got {config[key]!r}")
    return config


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter folder: {path.name} not found")
    config = _load_config(path)
    if config["peft_type"] != "LORA":
        raise ValueError(f"{folder}: only LoRA adapters can be imported, this one is {config['peft_type']!r}")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{folder}: {what} ({key}=true) has no BoRA equivalent; use a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{folder}: bias={config['bias']!r} trains bias vectors that BoRA does not have; need bias='none'"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: per-module rank_pattern / alpha_pattern are not supported")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, or a ValueError naming the file when it is not an intact safetensors file."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {WEIGHTS_FILE} not found (pickled .bin adapters are not read)")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not an intact safetensors file ({err}); export the adapter again") from None


def import_peft(lora: MultiTaskLoRA, folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's factors under bora_pyro's names, rescaled to ``lora``'s scaling.

    Shapes: -> name -> [r, in] ("<layer>.A") / [out, r] ("<layer>.B"), on ``lora``'s device.
    Raises ValueError naming the file and the problem when a file is damaged or of the wrong types, has
    NaN or inf values, or when rank, modules or shapes do not match.
    """
    folder = Path(folder)
    config = _read_config(folder)
    rank = config["r"]
    if rank != lora.rank:
        raise ValueError(
            f"{folder}: adapter rank r={rank} differs from this model's rank {lora.rank}; pass --rank {rank}"
        )
    theirs = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    rescale = theirs / (lora.alpha / lora.rank)  # keeps scaling * B @ A
    state = _read_weights(folder)
    factors, used = {}, set()
    for layer in lora.adapted:
        for factor, key in (("A", "lora_A"), ("B", "lora_B")):
            name = f"base_model.model.{layer.path}.{key}.weight"
            if name not in state:
                raise ValueError(
                    f"{folder}: no {key} weight for {layer.path!r}; the adapter targets other modules "
                    f"(it targets {config.get('target_modules')}; this model adapts {lora.paths()})"
                )
            value = state[name].float()
            expected = layer.shapes(lora.rank)[f"{layer.name}.{factor}"]
            if tuple(value.shape) != expected:
                raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, expected {expected}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has non-finite values (NaN or inf)")
            factors[f"{layer.name}.{factor}"] = (value * (rescale if factor == "B" else 1.0)).to(lora.device)
            used.add(name)
    extra = sorted(k for k in state if k not in used)
    if extra:
        targets = config.get("target_modules") or []
        raise ValueError(
            f"{folder}: the adapter has weights for modules this model does not adapt, e.g. {extra[0]!r}; "
            f"pass --targets {targets if isinstance(targets, str) else ','.join(targets)}"
        )
    return factors
