"""The tests' oracle: a Gaussian likelihood for the BoRA prior structure, with closed-form answers to check against.

Documents carry no text: document i of task d observes ``y_i ~ Normal(theta_d, sigma^2)`` for every
element of every LoRA factor. Swapped into ``BoRA(log_likelihood=...)``, the model becomes the
normal hierarchical model, whose MAP and exact posterior are known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from bora_pyro.data.batching import Batch, Split
from bora_pyro.data.corpus import Corpus
from bora_pyro.models.tau_prior import TauPrior


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
    def simulate(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        docs_per_task: Sequence[int],
        tau: float,
        sigma: float,
        generator: torch.Generator,
    ) -> GaussianObservations:
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

    def sampled_log_likelihood(
        self, samples: int
    ) -> Callable[[Mapping[str, torch.Tensor], Batch, torch.Generator], torch.Tensor]:
        """The log-likelihood of ``samples`` observation sets drawn from the model at ``factors`` (for the sampled
        Fisher of ``evaluation/messages.py``): y~ = theta_task + sigma eps, the draws held fixed.
        Shapes: -> [samples, batch]."""

        def fn(factors: Mapping[str, torch.Tensor], batch: Batch, generator: torch.Generator) -> torch.Tensor:
            total = 0.0
            for name in self.y:
                theta = factors[name][batch.task_index]  # [batch, *shape]
                eps = torch.randn((samples, *theta.shape), generator=generator, device=generator.device).to(theta)
                resid = theta.detach() + self.sigma * eps - theta
                total = total + (-0.5 * resid**2 / self.sigma**2).flatten(2).sum(-1)
            return total

        return fn

    def _task_means(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observations per task and task means of ``y``. Shapes: y [docs, *shape] -> [D], [D, *shape]."""
        num_tasks = int(self.task_index.max()) + 1
        n = torch.bincount(self.task_index, minlength=num_tasks)
        return n, torch.stack([y[self.task_index == d].mean(0) for d in range(num_tasks)])

    def _task_mean_gram(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Observations per task n [D], the Gram matrix of the task means summed over all factor
        elements G[d, e] = sum_j ybar_dj ybar_ej [D, D], and the number of elements J."""
        means = [self._task_means(y) for y in self.y.values()]
        ybar = torch.cat([m.flatten(1) for _, m in means], dim=1).double()  # [D, J]
        return means[0][0].double(), ybar @ ybar.T, ybar.shape[1]

    def tau_posterior(
        self, tau_prior: TauPrior, log_tau: torch.Tensor, theta: str = "empirical-bayes", em_steps: int = 200
    ) -> torch.Tensor:
        """Exact posterior of one shared tau on a grid of log tau (normalised weights, [grid]).

        theta_d is integrated out analytically: the task mean of element j is
        ybar_dj ~ N(Theta_j, v_d) with v_d = 1/tau + sigma^2/n_d. Theta is either
        ``"empirical-bayes"``: a point estimate maximising p(y | Theta) = ∫ p(y | Theta, tau) p(tau) dtau
        (found by EM on the grid) -- what BoRA fits when Theta is a ``pyro.param``, and so the exact
        answer its VI guide approximates; or ``"integrated"``: integrated out under a flat prior.
        Everything is computed from the Gram matrix of the task means, since Theta is always a
        combination sum_d a_d ybar_d of them.
        """
        n, gram, elements = self._task_mean_gram()
        tau = log_tau.double().exp()  # [K]
        var = 1.0 / tau[:, None] + self.sigma**2 / n[None, :]  # [K, D]
        weights = 1.0 / var
        prior = tau_prior.distribution(1, torch.device("cpu")).log_prob(tau[:, None].float()).double() + log_tau
        post = torch.softmax(prior, 0)

        def log_likelihood(coef: torch.Tensor) -> torch.Tensor:  # coef [K, D]: Theta = coef @ ybar per grid point
            cross = coef @ gram  # [K, D]: Theta . ybar_d
            quad = (weights * (gram.diagonal()[None] - 2 * cross + (cross * coef).sum(1, keepdim=True))).sum(1)
            return -0.5 * quad - 0.5 * elements * var.log().sum(1)  # [K]

        if theta == "integrated":  # precision-weighted mean at each tau, plus the Gaussian integral over Theta
            coef = weights / weights.sum(1, keepdim=True)
            return torch.softmax(prior + log_likelihood(coef) - 0.5 * elements * weights.sum(1).log(), 0)
        if theta != "empirical-bayes":
            raise ValueError(f"theta must be 'empirical-bayes' or 'integrated', got {theta!r}")
        for _ in range(em_steps):  # EM: Theta = sum_k p_k sum_d w_dk ybar_d / sum_k p_k sum_d w_dk
            coef = (post[:, None] * weights).sum(0)
            post = torch.softmax(prior + log_likelihood((coef / coef.sum()).expand_as(weights)), 0)
        return post

    def closed_form(self, name: str, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Theta (empirical Bayes / MAP), the posterior means of theta_d, and their posterior sds.

        Shapes: -> [*shape], [D, *shape], [D, 1, ...] (broadcastable).
        """
        y = self.y[name]
        n, ybar = self._task_means(y)
        n = n.float().view(-1, *([1] * (y.dim() - 1)))
        w = 1.0 / (self.sigma**2 / n + 1.0 / tau)
        theta_global = (w * ybar).sum(0) / w.sum(0)
        precision = n / self.sigma**2 + tau
        mean = (n * ybar / self.sigma**2 + tau * theta_global) / precision
        return theta_global, mean, precision.rsqrt()
