"""Gate values at the layer level (B-LoRA): the rank and precision gates one forward pass applies.

The Pyro side (the gates' parameters, draws, penalty and report) is ``models/gates.py``; this module
is what a LoRA layer needs to apply given gate values, so that ``nn`` never imports ``models``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantization import max_abs, residual_quantize


@dataclass(frozen=True)
class LayerGates:
    """Gate values of one adapted layer for one forward pass (relaxed in training, 0/1 at inference).

    Shapes: rank [G, r] (nested, g_1 = 1; G = 1 shared, else one row per task as the factors);
    weight_bits, act_bits [4] (z_4, z_8, z_16, z_32).
    """

    rank: torch.Tensor | None = None
    weight_bits: torch.Tensor | None = None
    act_bits: torch.Tensor | None = None

    def quantize_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """A stacked factor [G, ...] at the gated precision (range: each task's max |value|)."""
        if self.weight_bits is None:
            return factor
        return residual_quantize(factor, self.weight_bits, max_abs(factor, tuple(range(1, factor.dim()))))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input [batch, tokens, in] at the gated precision (range: each example's max |x|)."""
        if self.act_bits is None:
            return x
        return residual_quantize(x, self.act_bits, max_abs(x, (1, 2)))
