"""The hierarchical prior over task LoRA factors and its two exact limits.

    theta_d ~ Normal(Theta, tau^(-1/2))  elementwise, independent over tasks d   (0 < tau < inf)
    tau = 0    "independent": flat prior on every theta_d, Theta unused
    tau = inf  "pooled":      no task sites; every task uses Theta

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

INDEPENDENT, HIERARCHICAL, POOLED = "independent", "hierarchical", "pooled"
PARAMETERIZATIONS = ("centered", "noncentered")


def prior_mode(tau: float) -> str:
    """'independent' for tau = 0, 'pooled' for tau = inf, 'hierarchical' otherwise."""
    if tau == 0:
        return INDEPENDENT
    if math.isinf(tau):
        return POOLED
    return HIERARCHICAL


def parse_tau(value: str | float) -> float:
    """Parse a precision: a number >= 0, or 'inf'. Raises with the bad value named."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number >= 0 or 'inf', got {value!r}") from None
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"tau must be a number >= 0 or 'inf', got {value!r}")
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
    tau: float
    parameterization: str = "noncentered"

    def __post_init__(self) -> None:
        parse_tau(self.tau)
        if self.num_tasks < 1:
            raise ValueError(f"need at least one task, got num_tasks={self.num_tasks}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")

    @property
    def mode(self) -> str:
        return prior_mode(self.tau)

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
        out = {}
        with pyro.plate("tasks", self.num_tasks, dim=-1):
            for name, shape in self.shapes.items():
                if self.mode == INDEPENDENT:
                    prior = dist.ImproperUniform(constraints.real, (self.num_tasks,), torch.Size(shape))
                else:
                    loc = theta[name].expand(self.num_tasks, *shape)
                    scale = torch.full_like(loc, self.tau**-0.5)
                    prior = dist.Normal(loc, scale).to_event(len(shape))
                out[name] = pyro.sample(task_site(name), prior)
        return out

    @property
    def noncentered(self) -> bool:
        return self.mode == HIERARCHICAL and self.parameterization == "noncentered"

    def initial_values(self, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Guide start: every task at Theta's start (so z = 0 in the non-centred form, where the
        reparameteriser derives the decentred start from the task site's start)."""
        return {task_site(name): value.expand(self.num_tasks, *value.shape).clone() for name, value in init.items()}
