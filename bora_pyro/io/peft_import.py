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
from safetensors.torch import load_file

from ..nn.lora import MultiTaskLoRA

UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms"}


def _read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a PEFT adapter folder: {path.name} not found")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: only LoRA adapters can be imported, this one is {config.get('peft_type')!r}")
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


def import_peft(lora: MultiTaskLoRA, folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's factors under bora_pyro's names, rescaled to ``lora``'s scaling.

    Shapes: -> name -> [r, in] ("<layer>.A") / [out, r] ("<layer>.B"), on ``lora``'s device.
    Raises naming the problem when rank, modules or shapes do not match.
    """
    folder = Path(folder)
    config = _read_config(folder)
    rank = int(config["r"])
    if rank != lora.rank:
        raise ValueError(
            f"{folder}: adapter rank r={rank} differs from this model's rank {lora.rank}; pass --rank {rank}"
        )
    theirs = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    rescale = theirs / (lora.alpha / lora.rank)  # keeps scaling * B @ A
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{folder}: adapter_model.safetensors not found (pickled .bin adapters are not read)")
    state = load_file(str(weights_file))
    factors, used = {}, set()
    for layer in lora.adapted:
        for factor, key in (("A", "lora_A"), ("B", "lora_B")):
            name = f"base_model.model.{layer.path}.{key}.weight"
            if name not in state:
                raise ValueError(
                    f"{folder}: no {key} weight for {layer.path!r}; the adapter targets other modules "
                    f"(it targets {config.get('target_modules')}; this model adapts {list(lora.targets)})"
                )
            value = state[name].float() * (rescale if factor == "B" else 1.0)
            expected = layer.shapes(lora.rank)[f"{layer.name}.{factor}"]
            if tuple(value.shape) != expected:
                raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, expected {expected}")
            factors[f"{layer.name}.{factor}"] = value.to(lora.device)
            used.add(name)
    extra = sorted(k for k in state if k not in used)
    if extra:
        raise ValueError(
            f"{folder}: the adapter has weights for modules this model does not adapt, e.g. {extra[0]!r}; "
            f"pass --targets {','.join(config.get('target_modules') or [])}"
        )
    return factors
