"""Residual quantisation with gated refinements (Bayesian Bits) and bit-operation accounting.

A tensor clipped to [-beta, beta] is written as a 2-bit grid value plus residuals on ever finer
grids (van Baalen et al., 2020)::

    s_2 = 2 beta / (2^2 - 1),   s_2b = s_b / (2^b + 1)          (b = 2, 4, 8, 16)
    x_2 = s_2 round(x / s_2),   e_2b = s_2b round((x - x_b) / s_2b),   x_2b = x_b + e_2b
    x_q = x_2 + z_4 (e_4 + z_8 (e_8 + z_16 (e_16 + z_32 e_32)))

so gate z_b in [0, 1] switches the refinement from b/2 to b bits, and a closed gate closes all finer
ones (the gates are nested by construction). Rounding passes gradients straight through.

Bit operations (BOPs, B-LoRA Appendix D): MACs x weight bits x activation bits. A LoRA block of
rank r on an [out, in] layer costs r (in + out) MACs per token.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8, 16, 32)  # bit-widths: the base grid and the four gated refinements
FULL_BITS = BITS[-1]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer; the gradient passes straight through (identity)."""
    return x + (x.round() - x).detach()


def step_sizes(beta: torch.Tensor) -> list[torch.Tensor]:
    """The grid step of each bit-width in :data:`BITS` for the range [-beta, beta] (shapes of ``beta``)."""
    steps = [2 * beta / (2 ** BITS[0] - 1)]
    for bits in BITS[:-1]:
        steps.append(steps[-1] / (2**bits + 1))
    return steps


def residual_terms(x: torch.Tensor, beta: torch.Tensor) -> list[torch.Tensor]:
    """[x_2, e_4, e_8, e_16, e_32] of ``x`` clipped to [-beta, beta]; the sum of the first k terms is the
    quantisation at ``BITS[k - 1]`` bits. Shapes: x [...], beta broadcastable to x -> each [...]."""
    clipped = torch.maximum(torch.minimum(x, beta), -beta)
    terms, approx = [], torch.zeros_like(clipped)
    for step in step_sizes(beta):
        term = step * round_ste((clipped - approx) / step)
        terms.append(term)
        approx = approx + term
    return terms


def residual_quantize(x: torch.Tensor, gates: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x`` clipped to [-beta, beta] and quantised at the precision the gates select.

    Shapes: x [...], gates [4] (z_4, z_8, z_16, z_32 in [0, 1]), beta broadcastable to x -> [...].
    """
    terms = residual_terms(x, beta)
    out = terms[-1]
    for gate, term in zip(gates.flip(0)[:-1], reversed(terms[1:-1])):  # z_32 ... z_8 applied inside-out
        out = term + gate * out
    return terms[0] + gates[0] * out


def max_abs(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The clipping range beta = max |x| over ``dims`` (kept), without gradient; never 0."""
    return x.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)


def bits_of(gates: torch.Tensor) -> int:
    """Bit-width selected by 0/1 nested gates [4]: 2 bits, doubled for each leading open gate."""
    open_leading = int(torch.cumprod((gates > 0.5).long(), 0).sum())
    return BITS[open_leading]


def lora_bops(in_features: int, out_features: int, rank: float, weight_bits: int, activation_bits: int) -> float:
    """Bit operations per token of a LoRA block: rank (in + out) MACs x weight bits x activation bits."""
    return rank * (in_features + out_features) * weight_bits * activation_bits
