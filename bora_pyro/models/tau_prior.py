"""Hyperprior on the precision tau, for ``tau="learn"`` (variational inference only).

The MAP of a hierarchical precision is degenerate: the joint density grows without bound as every
theta_d collapses onto Theta and tau -> inf. A learned tau therefore needs a guide that keeps
uncertainty (AutoNormal), never AutoDelta alone.

Spec strings: ``lognormal:LOC,SCALE`` (log tau ~ Normal(LOC, SCALE); default ``lognormal:4.6,2``,
a median of 100 with 95% of the mass between 2 and 5000) or ``gamma:SHAPE,RATE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

TAU_PRIORS = ("lognormal", "gamma")
TAU_GROUPS = ("global", "module")  # one tau for all factors, or one per module type (q_proj, v_proj...)
TAU_SITE = "tau"


def module_type(factor_name: str) -> str:
    """ "layers.3.self_attn.q_proj.A" -> "q_proj"."""
    return factor_name.rsplit(".", 2)[-2]


FLOAT32 = torch.finfo(torch.float32)  # tau and its prior's parameters are float32 tensors
MAX_LOC = 87.0  # e^LOC (tau's median and start value) is a positive float32 number for |LOC| < 87
TAU_PRIOR_FORMS = f"'lognormal:LOC,SCALE' (|LOC| < {MAX_LOC:g}, SCALE > 0) or 'gamma:SHAPE,RATE' (both > 0)"


def _not_positive_float32(name: str, value: float) -> str | None:
    """Why ``value`` is not a number float32 holds as a positive normal number (not rounded to 0 or inf)."""
    if math.isfinite(value) and FLOAT32.tiny <= value <= FLOAT32.max:
        return None
    return f"{name}={value!r} must be a finite number > 0 (float32: {FLOAT32.tiny:.2g} to {FLOAT32.max:.2g})"


def _out_of_range(kind: str, a: float, b: float) -> str | None:
    """What is wrong with the parameters (a, b) of a ``kind`` prior, or None if they are fine. The start
    value of tau (the median e^LOC, or the mean SHAPE/RATE) must be a positive float32 number too."""
    if kind == "lognormal":
        if not abs(a) < MAX_LOC:  # NaN fails too
            return f"LOC={a!r} must be finite with |LOC| < {MAX_LOC:g} (e^LOC, tau's median, is a float32 number)"
        return _not_positive_float32("SCALE", b)
    problem = _not_positive_float32("SHAPE", a) or _not_positive_float32("RATE", b)
    if problem is not None:
        return f"gamma needs positive parameters: {problem}"
    return _not_positive_float32("the mean SHAPE/RATE", a / b)


@dataclass(frozen=True)
class TauPrior:
    """A LogNormal or Gamma hyperprior on tau, shared by all factors or one per module type."""

    kind: str = "lognormal"
    a: float = 4.6  # lognormal: loc of log tau; gamma: shape
    b: float = 2.0  # lognormal: scale of log tau; gamma: rate
    groups: str = "global"

    def __post_init__(self) -> None:
        if self.kind not in TAU_PRIORS:
            raise ValueError(f"tau prior must be one of {TAU_PRIORS}, got {self.kind!r}; allowed: {TAU_PRIOR_FORMS}")
        if self.groups not in TAU_GROUPS:
            raise ValueError(f"tau groups must be one of {TAU_GROUPS}, got {self.groups!r}")
        problem = _out_of_range(self.kind, self.a, self.b)
        if problem is not None:
            raise ValueError(
                f"tau prior '{self.kind}:{self.a!r},{self.b!r}' is invalid: {problem}; allowed: {TAU_PRIOR_FORMS}"
            )

    @classmethod
    def parse(cls, text: str, groups: str = "global") -> TauPrior:
        """Parse ``"lognormal:4.6,2"`` / ``"gamma:2,0.02"``; anything else is a ValueError naming the form."""
        kind, colon, params = str(text).partition(":")
        try:
            a, b = (float(v) for v in params.split(","))
        except ValueError:
            a = b = None
        if not colon or a is None:
            raise ValueError(f"tau prior must look like {TAU_PRIOR_FORMS}; got {text!r}")
        return cls(kind.strip().lower(), a, b, groups)

    def group_names(self, factor_names: Sequence[str]) -> list[str]:
        if self.groups == "global":
            return ["all"]
        return list(dict.fromkeys(module_type(n) for n in factor_names))

    def group_index(self, factor_names: Sequence[str]) -> dict[str, int]:
        """Factor name -> index of its tau."""
        names = self.group_names(factor_names)
        return {n: 0 if self.groups == "global" else names.index(module_type(n)) for n in factor_names}

    def distribution(self, num_groups: int, device: torch.device) -> dist.Distribution:
        a = torch.full((num_groups,), self.a, device=device)
        b = torch.full((num_groups,), self.b, device=device)
        base = dist.LogNormal(a, b) if self.kind == "lognormal" else dist.Gamma(a, b)
        return base.to_event(1)

    def sample(self, num_groups: int, device: torch.device) -> torch.Tensor:
        """The ``tau`` site (outside every plate). Shape: [groups]."""
        return pyro.sample(TAU_SITE, self.distribution(num_groups, device))

    def median(self) -> float:
        """A central start value for tau (the median for LogNormal, the mean for Gamma)."""
        return math.exp(self.a) if self.kind == "lognormal" else self.a / self.b
