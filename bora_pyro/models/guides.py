"""Guides over the task LoRA sites: AutoDelta (MAP, the paper) or AutoNormal (mean-field VI)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoNormal, init_to_value

INFERENCE = ("map", "vi")


def is_uncertainty_parameter(param_name: str) -> bool:
    """True for the guide parameters that carry uncertainty or hyperparameters rather than LoRA
    weights: AutoNormal's scales and both parameters of the ``tau`` site's guide. They get their
    own learning rate (``TrainConfig.guide_lr``): at the LoRA learning rate (1e-3) a log-scale moves
    by ~0.001 per step, so within a few hundred steps the guide would stay at its starting width."""
    parts = param_name.split(".")
    return len(parts) >= 3 and parts[0].startswith("Auto") and (parts[1] == "scales" or parts[2:] == ["tau"])


def make_guide(
    kind: str, model: Callable, initial_values: Mapping[str, torch.Tensor], init_scale: float = 1e-3
) -> AutoGuide:
    """``"map"``: AutoDelta (posterior mode); ``"vi"``: AutoNormal (mean-field Gaussian).

    Every latent site starts at ``initial_values`` (LoRA start, each task at Theta); AutoNormal's
    scales start at ``init_scale``.
    """
    init = init_to_value(values=dict(initial_values))
    if kind == "map":
        return AutoDelta(model, init_loc_fn=init)
    if kind == "vi":
        return AutoNormal(model, init_loc_fn=init, init_scale=init_scale)
    raise ValueError(f"inference must be one of {INFERENCE}, got {kind!r}")
