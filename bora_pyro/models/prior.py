"""The hierarchical prior over task LoRA factors and its two exact limits.

    theta_d ~ Normal(Theta, tau^(-1/2))  elementwise, independent over tasks d   (0 < tau < inf)
    tau = 0    "independent": flat prior on every theta_d, Theta unused
    tau = inf  "pooled":      no task sites; every task uses Theta
    tau = "learn"             tau is a latent site ``tau`` under a hyperprior (see tau_prior.py)

Theta (one tensor per factor, ``global.<layer>.A|B``) is a ``pyro.param`` (flat prior).
Task factors are ``pyro.sample`` sites ``task.<layer>.A|B`` of shape [D, ...] inside
``pyro.plate("tasks", D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.reparam import LocScaleReparam

from .tau_prior import TAU_SITE, TauPrior

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


def parse_tau(value: str | float) -> Tau:
    """Parse a precision: a number >= 0, 'inf', or 'learn'. Raises with the bad value named."""
    if isinstance(value, str) and value.strip().lower() == LEARN:
        return LEARN
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number >= 0, 'inf' or 'learn', got {value!r}") from None
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"tau must be a number >= 0, 'inf' or 'learn', got {value!r}")
    return tau


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

    def __post_init__(self) -> None:
        parse_tau(self.tau)
        if self.num_tasks < 1:
            raise ValueError(f"need at least one task, got num_tasks={self.num_tasks}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")

    @property
    def mode(self) -> str:
        return prior_mode(self.tau)

    @property
    def learned(self) -> bool:
        return self.tau == LEARN

    def tau_groups(self) -> list[str]:
        """Names of the learned precisions (one, or one per module type)."""
        return self.tau_prior.group_names(list(self.shapes))

    def global_factors(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Theta: one ``pyro.param`` per factor. Shapes: name -> [*shape]."""
        return {name: pyro.param(global_param(name), lambda name=name: init[name].clone()) for name in self.shapes}

    def reparam_config(self) -> dict[str, LocScaleReparam]:
        """Pyro reparam config of the non-centred form: theta_d = Theta + tau^(-1/2) z_d."""
        if not self.noncentered:
            return {}
        return {task_site(name): LocScaleReparam(centered=0.0) for name in self.shapes}

    def sample(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample (or, under a guide, look up) the task factors. Shapes: name -> [D or 1, *shape].

        Must run under ``poutine.reparam(config=self.reparam_config())`` for the non-centred form.
        """
        if self.mode == POOLED:
            return {name: theta.unsqueeze(0) for name, theta in self.global_factors(init).items()}
        theta = self.global_factors(init) if self.mode == HIERARCHICAL else {}
        if self.learned:
            device = next(iter(init.values())).device
            tau = self.tau_prior.sample(len(self.tau_groups()), device)  # [groups]
            group = self.tau_prior.group_index(list(self.shapes))
        out = {}
        with pyro.plate("tasks", self.num_tasks, dim=-1):
            for name, shape in self.shapes.items():
                if self.mode == INDEPENDENT:
                    prior = dist.ImproperUniform(constraints.real, (self.num_tasks,), torch.Size(shape))
                else:
                    loc = theta[name].expand(self.num_tasks, *shape)
                    scale = (tau[group[name]] if self.learned else torch.tensor(self.tau, device=loc.device)) ** -0.5
                    scale = scale.expand(loc.shape)
                    prior = dist.Normal(loc, scale).to_event(len(shape))
                out[name] = pyro.sample(task_site(name), prior)
        return out

    @property
    def noncentered(self) -> bool:
        return self.mode == HIERARCHICAL and self.parameterization == "noncentered"

    def initial_values(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Guide start: every task at Theta's start (so z = 0 in the non-centred form, where the
        reparameteriser derives the decentred start from the task site's start)."""
        values = {task_site(name): value.expand(self.num_tasks, *value.shape).clone() for name, value in init.items()}
        if self.learned:
            device = next(iter(init.values())).device
            values[TAU_SITE] = torch.full((len(self.tau_groups()),), self.tau_prior.median(), device=device)
        return values
