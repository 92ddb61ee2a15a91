"""B-LoRA gates: learned rank and precision of each LoRA block, inside the BoRA model.

Rank gates. Each block's update B A is read SVD-style as B E A with E diagonal (E is absorbed into B:
the same family of updates), and rank component i is switched by gate g_i with nested Bernoulli prior
g_1 = 1, p(g_{i+1} = 1 | g_i = 1) = e^-lambda. Precision gates switch the 4/8/16/32-bit refinements
of the residual quantiser (``quantization.py``) of the block's factors and, optionally, of its input
activations (nested the same way, 2 bits always on).

Each gate's variational distribution is a hard concrete (Louizos et al., 2018) with a learned
log-alpha (a ``pyro.param`` ``gates.<layer>.rank|weight_bits|act_bits``): during training the
model draws relaxed gates in [0, 1]; at inference a gate is exactly 1 where P(g > 0) >= 1/2, else 0,
and the products keep the gates nested. The model adds ``pyro.factor("gates.penalty", -lambda E[open
gates])`` (B-LoRA's eq. 15): the expected log prior of the nested gates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import pyro
import torch

from ..nn.gates import LayerGates
from ..nn.lora import AdaptedLayer
from ..nn.quantization import BITS, FULL_BITS, bits_of, lora_bops
from ..options import option
from .task_subsample import TaskSubsample

GAMMA, ZETA, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0  # hard-concrete stretch interval and temperature
RANK_MODES = ("shared", "per-task")
QUANT_MODES = ("weights", "weights+activations")
BIT_GATES = len(BITS) - 1  # z_4, z_8, z_16, z_32


def prob_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(g > 0) under the hard concrete with this log-alpha. Shapes: [...] -> [...]."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-GAMMA / ZETA))


def sample_hard_concrete(log_alpha: torch.Tensor) -> torch.Tensor:
    """A relaxed gate draw in [0, 1] (exactly 0 or 1 with positive probability), reparameterised."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / TEMPERATURE)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def nested(gates: torch.Tensor) -> torch.Tensor:
    """Products g_1, g_1 g_2, ...: gate i is open only if every gate before it is. Shapes: [..., k]."""
    return torch.cumprod(gates, dim=-1)


def expected_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """Expected number of open nested gates. Shapes: [..., k] -> [...]."""
    return nested(prob_open(log_alpha)).sum(-1)


FLOAT32_MAX = torch.finfo(torch.float32).max  # the gates' parameters and penalty are float32


def _float32(value: float) -> bool:
    """Whether ``value`` is a real number that float32 holds without becoming inf (NaN and bools are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


@dataclass(frozen=True)
class GateConfig:
    """Which B-LoRA gates a BoRA model has (every field is a CLI option)."""

    rank_gates: str | None = option(
        None,
        "learn each block's rank with nested hard-concrete gates, shared by the tasks (default when given) or per-task",
        choices=RANK_MODES,
        const="shared",
    )
    quant_gates: str | None = option(
        None,
        "learn each block's precision (2-32 bits) of the LoRA factors (default when "
        "given) and optionally of the layer's input activations",
        choices=QUANT_MODES,
        const="weights",
    )
    rank_lambda: float = option(1.0, "penalty per expected open rank gate (B-LoRA's lambda: the log prior of a gate)")
    quant_lambda: float = option(1.0, "penalty per expected open precision gate")
    gate_init: float = option(
        6.0,
        "the gates' starting log-alpha: 6 = relaxed below 1 about 1% of the time (3: a fifth of the "
        "time, 3-5% worse perplexity on both measured corpora); lower = gates close sooner",
    )

    def __post_init__(self) -> None:
        if self.rank_gates not in (None, *RANK_MODES):
            raise ValueError(f"rank gates must be one of {RANK_MODES} (or off), got {self.rank_gates!r}")
        if self.quant_gates not in (None, *QUANT_MODES):
            raise ValueError(f"quantisation gates must be one of {QUANT_MODES} (or off), got {self.quant_gates!r}")
        for name in ("rank_lambda", "quant_lambda"):
            value = getattr(self, name)
            if not (_float32(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (at most {FLOAT32_MAX:.2g}), got {value!r}")
        if not _float32(self.gate_init):
            raise ValueError(f"gate_init must be a finite number (|x| <= {FLOAT32_MAX:.2g}), got {self.gate_init!r}")

    @property
    def enabled(self) -> bool:
        return self.rank_gates is not None or self.quant_gates is not None


class Gates:
    """The gates of every adapted layer: their parameters, draws, penalty, inference values and report."""

    def __init__(self, config: GateConfig, layers: Sequence[AdaptedLayer], rank: int, num_tasks: int) -> None:
        self.config, self.layers, self.rank, self.num_tasks = config, list(layers), rank, num_tasks

    def _log_alpha(self, layer: str, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return pyro.param(f"gates.{layer}.{kind}", lambda: torch.full(shape, self.config.gate_init, device=device))

    def _kinds(self) -> dict[str, bool]:
        """The gate kinds of every layer, each with whether it has one row per task."""
        kinds = {"rank": self.config.rank_gates == "per-task"} if self.config.rank_gates is not None else {}
        if self.config.quant_gates is not None:
            kinds["weight_bits"] = False
        if self.config.quant_gates == "weights+activations":
            kinds["act_bits"] = False
        return kinds

    def parameter_layout(self) -> dict[str, bool]:
        """The gates' parameter names, each with whether it has one row per task (per-task rank gates)."""
        return {f"gates.{layer.name}.{kind}": rows for layer in self.layers for kind, rows in self._kinds().items()}

    def _parameters(self, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """log-alpha by layer and kind: rank [1 or D, r - 1] (g_1 is always open; one row per task for
        per-task gates), weight_bits / act_bits [4]."""

        def shape(kind: str, rows: bool) -> tuple[int, ...]:
            return ((self.num_tasks if rows else 1), self.rank - 1) if kind == "rank" else (BIT_GATES,)

        return {
            layer.name: {
                kind: self._log_alpha(layer.name, kind, shape(kind, rows), device)
                for kind, rows in self._kinds().items()
            }
            for layer in self.layers
        }

    def sample(self, device: torch.device, subsample: TaskSubsample | None) -> dict[str, LayerGates]:
        """Inside the Pyro model: relaxed gate draws for this batch and the penalty factor. Per-task rank
        gates are those of the ``subsample``'s tasks (penalised with their prior-term weights)."""
        penalty = torch.zeros((), device=device)
        out = {}
        for name, params in self._parameters(device).items():
            values = {}
            for kind, log_alpha in params.items():
                if kind == "rank":
                    weight = torch.ones(1, device=device)
                    if self.config.rank_gates == "per-task" and subsample is not None:
                        log_alpha, weight = log_alpha.index_select(0, subsample.index), subsample.weight
                    penalty = penalty + self.config.rank_lambda * (weight * expected_open(log_alpha)).sum()
                    values[kind] = self._with_first_open(nested(sample_hard_concrete(log_alpha)))
                else:  # the residual quantiser nests its refinement gates itself
                    penalty = penalty + self.config.quant_lambda * expected_open(log_alpha)
                    values[kind] = sample_hard_concrete(log_alpha)
            out[name] = LayerGates(**values)
        pyro.factor("gates.penalty", -penalty)
        return out

    @staticmethod
    def _with_first_open(gates: torch.Tensor) -> torch.Tensor:
        """[G, r - 1] -> [G, r] with g_1 = 1."""
        return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)

    @torch.no_grad()
    def inference(self, device: torch.device) -> dict[str, LayerGates]:
        """Exactly 0/1 nested gates: open where P(g > 0) >= 1/2 (call inside the model's param scope)."""
        out = {}
        for name, params in self._parameters(device).items():
            values = {kind: nested((prob_open(a) >= 0.5).to(a.dtype)) for kind, a in params.items()}
            if "rank" in values:
                values["rank"] = self._with_first_open(values["rank"])
            out[name] = LayerGates(**values)
        return out

    @torch.no_grad()
    def fold(self, factors: Mapping[str, torch.Tensor], gates: Mapping[str, LayerGates]) -> dict[str, torch.Tensor]:
        """Factors with 0/1 ``gates`` applied: B's closed rank columns zeroed, A and B at their learned
        precision (what the saved and exported adapters hold). Shapes: name -> [D, *shape]."""
        out = dict(factors)
        for name, g in gates.items():
            A, B = g.quantize_factor(factors[f"{name}.A"]), g.quantize_factor(factors[f"{name}.B"])
            out[f"{name}.A"], out[f"{name}.B"] = A, B if g.rank is None else B * g.rank[:, None, :]
        return out

    @torch.no_grad()
    def report(self, gates: Mapping[str, LayerGates]) -> pd.DataFrame:
        """One row per adapted layer: module type, effective rank (mean over tasks), weight and activation
        bits, BOPs per token and BOPs relative to the full-rank 32-bit block."""
        rows = []
        for layer in self.layers:
            g = gates[layer.name]
            rank = float(g.rank.sum(1).mean()) if g.rank is not None else float(self.rank)
            w_bits = bits_of(g.weight_bits) if g.weight_bits is not None else FULL_BITS
            a_bits = bits_of(g.act_bits) if g.act_bits is not None else FULL_BITS
            bops = lora_bops(layer.in_features, layer.out_features, rank, w_bits, a_bits)
            full = lora_bops(layer.in_features, layer.out_features, self.rank, FULL_BITS, FULL_BITS)
            parts = layer.name.split(".")
            rows.append(
                {
                    "layer": layer.name,
                    "block": int(parts[1]) if parts[0] == "layers" and parts[1].isdigit() else -1,
                    "module": parts[-1],
                    "rank": rank,
                    "weight_bits": w_bits,
                    "activation_bits": a_bits,
                    "bops": bops,
                    "full_bops": full,
                }
            )
        frame = pd.DataFrame(rows)
        frame["relative_bops"] = frame["bops"] / frame["full_bops"]
        return frame


def relative_bops(report: pd.DataFrame) -> float:
    """Total BOPs of the gated adapter relative to the full-rank 32-bit adapter."""
    return float(report["bops"].sum() / report["full_bops"].sum())
