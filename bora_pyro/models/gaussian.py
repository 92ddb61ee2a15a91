"""A Gaussian likelihood for the BoRA prior structure, with closed-form answers to check against.

Documents carry no text: document i of task d observes ``y_i ~ Normal(theta_d, sigma^2)`` for every
element of every LoRA factor. Swapped into ``BoRA(log_likelihood=...)``, the model becomes the
normal hierarchical model, whose MAP and exact posterior are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..data.batching import Batch, Split
from ..data.corpus import Corpus


def observation_corpus(docs_per_task: Sequence[int]) -> Corpus:
    """A corpus of empty documents (one scored token each); train = valid = test."""
    task_index = tuple(d for d, n in enumerate(docs_per_task) for _ in range(n))
    ids = tuple((1, 2) for _ in task_index)
    tasks = tuple(f"task{d}" for d in range(len(docs_per_task)))
    split = Split("train", tasks, ids, ids, task_index, pad_token_id=0)
    return Corpus("gaussian", tasks, split, split, split)


@dataclass(frozen=True)
class GaussianObservations:
    """Observations ``y[name]`` of shape [docs, *factor shape] and their noise scale ``sigma``."""

    y: Mapping[str, torch.Tensor]
    task_index: torch.Tensor  # [docs]
    sigma: float
    theta: Mapping[str, torch.Tensor] | None = None  # the simulated truth, [D, *shape]

    @classmethod
    def simulate(cls, shapes: Mapping[str, tuple[int, ...]], docs_per_task: Sequence[int], tau: float,
                 sigma: float, generator: torch.Generator) -> "GaussianObservations":
        """theta_d ~ N(0, 1/tau) (Theta = 0), then y ~ N(theta_task, sigma^2)."""
        task = torch.tensor([d for d, n in enumerate(docs_per_task) for _ in range(n)])
        y, truth = {}, {}
        for name, shape in shapes.items():
            truth[name] = tau**-0.5 * torch.randn((len(docs_per_task), *shape), generator=generator)
            y[name] = truth[name][task] + sigma * torch.randn((len(task), *shape), generator=generator)
        return cls(y, task, sigma, truth)

    def empirical_tau(self) -> float:
        """1 / mean squared simulated theta (Theta = 0): the precision the draws actually have."""
        assert self.theta is not None, "only simulated observations know their theta"
        squares = torch.cat([t.flatten() ** 2 for t in self.theta.values()])
        return float(1.0 / squares.mean())

    def log_likelihood(self, factors: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Sum over observed elements of log N(y; theta_task, sigma^2), constants dropped. Shapes: -> [batch]."""
        total = 0.0
        for name, y in self.y.items():
            resid = y[batch.doc_index] - factors[name][batch.task_index]
            total = total + (-0.5 * resid**2 / self.sigma**2).flatten(1).sum(-1)
        return total

    def closed_form(self, name: str, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Theta (empirical Bayes / MAP), the posterior means of theta_d, and their posterior sds.

        Shapes: -> [*shape], [D, *shape], [D, 1, ...] (broadcastable).
        """
        y, task = self.y[name], self.task_index
        num_tasks = int(task.max()) + 1
        n = torch.bincount(task, minlength=num_tasks).float().view(-1, *([1] * (y.dim() - 1)))
        ybar = torch.stack([y[task == d].mean(0) for d in range(num_tasks)])
        w = 1.0 / (self.sigma**2 / n + 1.0 / tau)
        theta_global = (w * ybar).sum(0) / w.sum(0)
        precision = n / self.sigma**2 + tau
        mean = (n * ybar / self.sigma**2 + tau * theta_global) / precision
        return theta_global, mean, precision.rsqrt()
