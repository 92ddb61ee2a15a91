"""The hierarchical prior over task LoRA factors and its two exact limits.

    theta_d ~ Normal(Theta, tau^(-1/2))  elementwise, independent over tasks d   (0 < tau < inf)
    tau = 0    "independent": flat prior on every theta_d, Theta unused
    tau = inf  "pooled":      no task sites; every task uses Theta
    tau = "learn"             tau is a latent site ``tau`` under a hyperprior (see tau_prior.py)

Theta (one tensor per factor, ``global.<layer>.A|B``) is a ``pyro.param`` (flat prior; the fit is
empirical Bayes for Theta), or, with ``global_scale`` set, a latent site under Normal(0, global_scale)
outside the task plate, so that its uncertainty is integrated over (what a learned tau needs to be
calibrated: see experiments/tau_recovery.py).
Task factors are ``pyro.sample`` sites ``task.<layer>.A|B`` of shape [D, ...] inside
``pyro.plate("tasks", D)``; in the non-centred form the latent sites are the standardised
deviations ``task.<layer>.A|B_decentered`` (z_d ~ N(0, I)) and ``task.<layer>.A|B`` is deterministic.
Densities use :class:`StackedNormal` (cheap over millions of elements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ..options import option
from .stacked_normal import StackedNormal
from .task_subsample import TASK_PLATE, TaskSubsample, enter_plate
from .tau_prior import TAU_GROUPS, TAU_SITE, TauPrior

INDEPENDENT, HIERARCHICAL, POOLED = "independent", "hierarchical", "pooled"
PARAMETERIZATIONS = ("centered", "noncentered")
LEARN = "learn"
Tau = float | str  # a precision >= 0 (inf allowed) or LEARN


def prior_mode(tau: Tau) -> str:
    """'independent' for tau = 0, 'pooled' for tau = inf, 'hierarchical' otherwise (learned included)."""
    if tau == LEARN:
        return HIERARCHICAL
    if tau == 0:
        return INDEPENDENT
    if math.isinf(tau):
        return POOLED
    return HIERARCHICAL


TAU_RANGE = (1e-30, 1e30)  # finite precisions whose scale tau^-1/2 and its square stay normal float32 numbers


def parse_tau(value: str | float) -> Tau:
    """Parse a precision: 0, a number in :data:`TAU_RANGE`, 'inf', or 'learn'. Raises with the bad value named."""
    if isinstance(value, str) and value.strip().lower() == LEARN:
        return LEARN
    allowed = f"0, a number in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], 'inf' or 'learn'"
    if isinstance(value, bool):
        raise ValueError(f"tau must be {allowed}, got {value!r}")
    try:
        tau = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"tau must be {allowed}, got {value!r}") from None
    if not (tau == 0 or math.isinf(tau) and tau > 0 or TAU_RANGE[0] <= tau <= TAU_RANGE[1]):
        raise ValueError(f"tau must be {allowed} (0 and inf are the exact limits), got {value!r}")
    return tau


def parse_global_prior(text: str) -> float | None:
    """``"flat"`` -> None (Theta a parameter); ``"normal:SCALE"`` -> SCALE (Theta latent). Raises with the bad value."""
    kind, _, scale = text.strip().lower().partition(":")
    if kind == "flat" and not scale:
        return None
    try:
        value = float(scale) if kind == "normal" else float("nan")
    except ValueError:
        value = float("nan")
    if not 0 < value < math.inf:
        raise ValueError(f"global prior must be 'flat' or 'normal:SCALE' with SCALE > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class PriorConfig:
    """The hierarchical prior's settings (every field is a CLI option)."""

    tau: Tau = option(
        100.0,
        "prior precision: a number >= 0, 0 = independent adapters, inf = one pooled adapter, "
        "learn = inferred under --tau-prior (needs --inference vi)",
        parse=parse_tau,
    )
    parameterization: str = option(
        "noncentered",
        "noncentered: theta_d = Theta + tau^-1/2 z_d with z_d ~ N(0, I) the "
        "latent site; centered: theta_d sampled around Theta",
        choices=PARAMETERIZATIONS,
    )
    tau_prior: str = option(
        "lognormal:4.6,2", "hyperprior of --tau learn: lognormal:LOC,SCALE (of log tau) or gamma:SHAPE,RATE"
    )
    tau_groups: str = option(
        "global", "--tau learn: one tau, or one per module type (q_proj, v_proj...)", choices=TAU_GROUPS
    )
    global_prior: str = option(
        "flat", "Theta: flat (a parameter, empirical Bayes) or normal:SCALE (a latent site, inferred)"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", parse_tau(self.tau))
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        self.hyperprior()  # validates the specs
        self.global_scale()

    def hyperprior(self) -> TauPrior:
        return TauPrior.parse(self.tau_prior, self.tau_groups)

    def global_scale(self) -> float | None:
        """None: Theta is a parameter; a number: Theta ~ Normal(0, scale) is latent."""
        return parse_global_prior(self.global_prior)


def task_site(name: str) -> str:
    return f"task.{name}"


def global_param(name: str) -> str:
    return f"global.{name}"


@dataclass(frozen=True)
class HierarchicalPrior:
    """Samples the stacked task factors under the prior; see the module docstring.

    ``shapes`` maps factor names to per-task shapes; ``init`` gives Theta's starting values
    (standard LoRA: A random, B zero) and is also every task's start.
    """

    shapes: Mapping[str, tuple[int, ...]]
    num_tasks: int
    tau: Tau
    parameterization: str = "noncentered"
    tau_prior: TauPrior = TauPrior()  # used only when tau == "learn"
    global_scale: float | None = None  # None: Theta is a parameter; else Theta ~ Normal(0, global_scale)

    def __post_init__(self) -> None:
        parse_tau(self.tau)
        if self.num_tasks < 1:
            raise ValueError(f"need at least one task, got num_tasks={self.num_tasks}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.global_scale is not None and not (0 < self.global_scale < math.inf):
            raise ValueError(f"global_scale must be a finite number > 0 or None, got {self.global_scale!r}")

    @property
    def latent_global(self) -> bool:
        """Theta is a latent site (not in the independent mode, where it does not exist)."""
        return self.global_scale is not None and self.mode != INDEPENDENT

    @property
    def global_precision(self) -> float:
        """Theta's prior precision: 1 / global_scale^2 where Theta is latent, 0 where its prior is flat."""
        return self.global_scale**-2.0 if self.latent_global else 0.0

    @property
    def mode(self) -> str:
        return prior_mode(self.tau)

    def global_sites(self) -> list[str]:
        """The latent sites of Theta (none when Theta is a parameter or does not exist)."""
        return [global_param(name) for name in self.shapes] if self.latent_global else []

    @property
    def learned(self) -> bool:
        return self.tau == LEARN

    def tau_groups(self) -> list[str]:
        """Names of the learned precisions (one, or one per module type)."""
        return self.tau_prior.group_names(list(self.shapes))

    def global_factors(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Theta: one ``pyro.param`` per factor, or one latent site each (``global_scale``).
        Shapes: name -> [*shape]."""
        if not self.latent_global:
            return {name: pyro.param(global_param(name), lambda name=name: init[name].clone()) for name in self.shapes}
        return {
            name: pyro.sample(
                global_param(name),
                dist.Normal(torch.zeros_like(init[name]), self.global_scale).to_event(init[name].dim()),
            )
            for name in self.shapes
        }

    def sample(
        self, init: Mapping[str, torch.Tensor], subsample: TaskSubsample | None = None
    ) -> dict[str, torch.Tensor]:
        """Sample (or, under a guide, look up) the task factors. Shapes: name -> [D or 1, *shape], or
        [P, *shape] for the ``subsample`` of P present tasks (their prior terms weighted, see task_subsample.py).

        Non-centred: z_d ~ N(0, I) is the latent site ``task.<name>_decentered`` and
        theta_d = Theta + tau^(-1/2) z_d is recorded as the deterministic site ``task.<name>``.
        """
        if self.mode == POOLED:
            return {name: theta.unsqueeze(0) for name, theta in self.global_factors(init).items()}
        theta = self.global_factors(init) if self.mode == HIERARCHICAL else {}
        device = next(iter(init.values())).device
        if self.learned:
            scales = self.tau_prior.sample(len(self.tau_groups()), device) ** -0.5  # [groups]
            group = self.tau_prior.group_index(list(self.shapes))
        elif self.mode == HIERARCHICAL:
            fixed_scale = torch.tensor(self.tau**-0.5, device=device)
        plate = pyro.plate(TASK_PLATE, self.num_tasks, dim=-1) if subsample is None else subsample.plate()
        present = (self.num_tasks,) if subsample is None else (subsample.index.numel(),)
        out = {}
        with enter_plate(plate):
            for name, shape in self.shapes.items():
                site = task_site(name)
                if self.mode == INDEPENDENT:
                    out[name] = pyro.sample(site, dist.ImproperUniform(constraints.real, present, shape))
                    continue
                scale = scales[group[name]] if self.learned else fixed_scale  # []
                if self.noncentered:
                    z = pyro.sample(
                        f"{site}_decentered", StackedNormal(None, torch.ones((), device=device), shape, present)
                    )
                    out[name] = pyro.deterministic(site, theta[name] + scale * z, event_dim=len(shape))
                else:
                    out[name] = pyro.sample(site, StackedNormal(theta[name], scale, shape, present))
        return out

    @property
    def noncentered(self) -> bool:
        return self.mode == HIERARCHICAL and self.parameterization == "noncentered"

    def task_sites(self) -> list[str]:
        """The latent sites under the task plate (one row per task): z_d (non-centred) or theta_d."""
        if self.mode == POOLED:
            return []
        suffix = "_decentered" if self.noncentered else ""
        return [f"{task_site(name)}{suffix}" for name in self.shapes]

    def initial_values(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Guide start: Theta (if latent) and every task at Theta's start (z = 0 in the non-centred form).
        Task values are expanded views [D, *shape] of one tensor (no memory per task)."""
        if self.noncentered:  # z = 0
            values = {
                f"{task_site(name)}_decentered": value.new_zeros(()).expand(self.num_tasks, *value.shape)
                for name, value in init.items()
            }
        else:
            values = {task_site(name): value.expand(self.num_tasks, *value.shape) for name, value in init.items()}
        if self.latent_global:
            values.update({global_param(name): value.clone() for name, value in init.items()})
        if self.learned:
            device = next(iter(init.values())).device
            values[TAU_SITE] = torch.full((len(self.tau_groups()),), self.tau_prior.median(), device=device)
        return values
