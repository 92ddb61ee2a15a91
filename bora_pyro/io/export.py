"""Export a run's adapters in PEFT's on-disk LoRA format: one folder per task, plus ``global`` (Theta).

Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
``peft.PeftModel.from_pretrained(base_model, folder)``. Task names become filesystem-safe folder
names; ``tasks.json`` maps every task name to its folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.task_names import GLOBAL
from ..nn.lora import Factors, MultiTaskLoRA, TaskRows, rows_of
from .artifacts import write_json
from .folders import atomic_folder

MAX_FOLDER_NAME = 100  # bytes (ASCII characters); file systems allow 255


def safe_names(tasks: Sequence[str]) -> dict[str, str]:
    """Task name -> a unique folder name of letters, digits, '-', '_' and '.' ("global" is reserved).

    Other characters become '_'. A name longer than ``MAX_FOLDER_NAME`` keeps its start and ends in '-'
    and the first 8 hex digits of the SHA-1 of the task name (stable, and distinct for names that share
    the start); names that would still clash (also by case) get '_2', '_3'...
    """
    out: dict[str, str] = {}
    used = {GLOBAL}
    for task in tasks:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
        if len(base) > MAX_FOLDER_NAME:
            digest = hashlib.sha1(task.encode("utf-8")).hexdigest()[:8]
            base = f"{base[: MAX_FOLDER_NAME - 9]}-{digest}"
        name, k = base, 1
        while name.lower() in used:
            k += 1
            suffix = f"_{k}"
            name = base[: MAX_FOLDER_NAME - len(suffix)] + suffix
        used.add(name.lower())
        out[task] = name
    return out


def peft_state_dict(lora: MultiTaskLoRA, factors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's factors (name -> [r, in] / [out, r]) under PEFT's key names."""
    state = {}
    for layer in lora.adapted:
        state[f"base_model.model.{layer.path}.lora_A.weight"] = factors[f"{layer.name}.A"].detach().cpu().contiguous()
        state[f"base_model.model.{layer.path}.lora_B.weight"] = factors[f"{layer.name}.B"].detach().cpu().contiguous()
    return state


def peft_config(lora: MultiTaskLoRA, base_model: str) -> dict:
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in lora.layers.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(lora.targets),
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def export_peft(
    lora: MultiTaskLoRA,
    tasks: Sequence[str],
    task_factors: Factors | TaskRows,
    global_factors: Mapping[str, torch.Tensor] | None,
    base_model: str,
    out: str | Path,
    overwrite: bool = False,
    note: str | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, str]:
    """Write one PEFT adapter folder per task (and ``global`` when Theta exists); returns the name map.

    ``base_model`` becomes every adapter's ``base_model_name_or_path`` (a hub id or path a user can
    load); ``note`` (e.g. how the training weights differ from it) goes into the folder's README.md.
    ``only``: export these tasks (and ``global``, if named) only. Adapters are read and written one task
    at a time. Shapes: task_factors name -> [D, ...] stacked, or a function of task ids (``TaskRows``);
    global_factors name -> [...].
    """
    wanted = list(tasks) + ([GLOBAL] if global_factors is not None else []) if only is None else list(only)
    unknown = [t for t in wanted if t not in tasks and not (t == GLOBAL and global_factors is not None)]
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown[:5]} to export; tasks: {list(tasks)[:10]}"
            f"{'...' if len(tasks) > 10 else ''}{' and global' if global_factors is not None else ''}"
        )
    names = {**safe_names(tasks), GLOBAL: GLOBAL}
    rows, index = rows_of(task_factors), {t: d for d, t in enumerate(tasks)}
    config = peft_config(lora, base_model)
    with atomic_folder(Path(out), "export", overwrite=overwrite) as tmp:
        folders = {}
        for task in wanted:
            factors = dict(global_factors) if task == GLOBAL else {k: v[0] for k, v in rows([index[task]]).items()}
            folder = tmp / names[task]
            folder.mkdir()
            write_json(folder / "adapter_config.json", config)
            save_file(peft_state_dict(lora, factors), str(folder / "adapter_model.safetensors"))
            folders[task] = names[task]
        write_json(tmp / "tasks.json", folders)
        (tmp / "README.md").write_text(
            f"# PEFT LoRA adapters exported by bora_pyro\n\nOne folder per task (tasks.json maps task names to "
            f"folders){', plus global (Theta)' if global_factors is not None else ''}. Base model: `{base_model}`"
            f'{f" ({note})" if note else ""}.\n\n    base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
            f'    model = peft.PeftModel.from_pretrained(base, "<folder>")\n'
        )
    return folders


@torch.no_grad()
def merge_into_base(lora: MultiTaskLoRA, factors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Fold one adapter (name -> [r, in] / [out, r]) into the base weights and unwrap the layers.

    Returns the plain Hugging Face model (``lora`` is unusable afterwards). NaN/inf factors are refused.
    """
    for name, value in factors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"cannot merge: factor {name!r} has non-finite values")
    for layer in lora.adapted:
        wrapped = lora.layers[layer.name]
        delta = wrapped.scaling * (factors[f"{layer.name}.B"] @ factors[f"{layer.name}.A"])  # [out, in]
        weight = wrapped.base_layer.weight
        weight += (delta.T if wrapped.fan_in_fan_out else delta).to(weight.dtype)
        parent, _, child = layer.path.rpartition(".")
        setattr(lora.lm.get_submodule(parent) if parent else lora.lm, child, wrapped.base_layer)
    lora.layers.clear()
    return lora.lm


def export_merged(
    lora: MultiTaskLoRA, tokenizer, factors: Mapping[str, torch.Tensor], out: str | Path, overwrite: bool = False
) -> None:
    """Write a full Hugging Face model (safetensors) with one adapter merged in, plus the tokenizer."""
    model = merge_into_base(lora, factors)
    with atomic_folder(Path(out), "merged", overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
