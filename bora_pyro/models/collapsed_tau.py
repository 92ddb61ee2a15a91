"""The collapsed posterior of tau (the INLA idea): Gaussian messages from every task, Theta integrated out.

Each task's log-likelihood is approximated coordinate by coordinate by a Gaussian message

    l_d(theta_dj) ~ -1/2 lam_dj (theta_dj - mu_dj)^2          (lam_dj >= 0; 0: the task says nothing of j)

(from a curvature pass or a VI guide: ``evaluation/messages.py``). Under theta_dj ~ N(Theta_j, 1/tau) the
message's mean is then mu_dj ~ N(Theta_j, 1/w_dj) with w_dj = lam_dj tau / (lam_dj + tau), and with Theta_j
integrated out under a flat prior (or a Normal(0, 1/g) one):

    log p(tau | data) = log p(tau) + sum_j [ sum_d ( 1/2 log w_dj - 1/2 w_dj (mu_dj - Thetabar_j)^2 )
                        - 1/2 g Thetabar_j^2 - 1/2 log (g + sum_d w_dj) ] + C,
    Thetabar_j = sum_d w_dj mu_dj / (g + sum_d w_dj),

evaluated on a grid of log tau that zooms onto the posterior's mass (with millions of coordinates it is narrow).
Given tau everything is Gaussian: Theta_j ~ N(Thetabar_j, 1/(g + sum_d w_dj)) and
theta_dj | Theta, tau ~ N((lam_dj mu_dj + tau Theta_j) / (lam_dj + tau), 1/(lam_dj + tau)), which gives the
tau-averaged posterior means (:func:`averaged_mean`) and joint draws (:func:`averaged_draws`).

Exact when the likelihood is Gaussian in theta (the normal hierarchical model); diagonal messages ignore
the correlations inside a task (between A and B of a LoRA factor, for one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .tau_prior import TauPrior

LOG_TAU_RANGE = (math.log(1e-4), math.log(1e9))  # the first, coarse grid
COARSE_POINTS, FINE_POINTS = 28, 121
GOLDEN_STEPS, PEAK_STEPS, WIDEN_STEPS = 30, 8, 8
KEEP_LOG_DENSITY = 25.0  # the final grid's ends lie this far below the peak of the log density (e^-25 ~ 1e-11)


@dataclass(frozen=True)
class Messages:
    """Gaussian messages of every task's log-likelihood, per coordinate. Shapes: ``mu``, ``lam``, ``point``:
    factor name -> [D, *shape] (``point``: where they were taken, the fitted task factors); ``source``: how
    they were made (e.g. "fisher-sampled, gradient-prior", "guide"); ``log_likelihood`` [D]: the height of each
    task's log-likelihood at ``point``, where a curvature pass measured it (scaled up to all its documents)."""

    mu: Mapping[str, torch.Tensor]
    lam: Mapping[str, torch.Tensor]
    point: Mapping[str, torch.Tensor]
    source: str
    stationarity: float | None = None  # see evaluation/messages.py: about 1 at a converged fit
    log_likelihood: torch.Tensor | None = None  # [D]: each task's log-likelihood at ``point`` (all its documents)

    @property
    def num_tasks(self) -> int:
        return next(iter(self.lam.values())).shape[0]

    def recentred(self, point: Mapping[str, torch.Tensor], lam: Mapping[str, torch.Tensor]) -> Messages:
        """The messages re-expanded at ``point`` with the curvature ``lam`` measured there, the gradient taken from
        the current quadratic (lam_old (mu - point)): mu' = point + lam_old / lam' (mu - point). A coordinate
        without a message before (lam_old = 0: dropped, or uninformed) gets none now either, nor where lam' is 0.
        Shapes: name -> [D, *shape]."""
        mu = {}
        for k, p in point.items():
            old, new, p64 = self.lam[k].double(), lam[k].double(), p.double().cpu()
            step = old / new.clamp_min(1e-300) * (self.mu[k].double() - p64)
            mu[k] = torch.where((new > 0) & (old > 0), p64 + step, p64).float()
        kept = {k: torch.where(self.lam[k] > 0, lam[k].cpu(), torch.zeros_like(lam[k].cpu())).float() for k in lam}
        return Messages(mu, kept, dict(point), f"{self.source}, refreshed")

    def restricted(self, min_lam: Mapping[str, float]) -> Messages:
        """The messages with lam < ``min_lam[name]`` dropped (lam = 0): see :func:`trusted_precision`."""
        lam = {k: torch.where(v >= min_lam[k], v, torch.zeros_like(v)) for k, v in self.lam.items()}
        return dataclasses.replace(self, lam=lam)

    def coordinates(self) -> int:
        """Coordinates per task (all factors)."""
        return sum(v[0].numel() for v in self.lam.values())


def _flat(messages: Messages, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, lam of one factor in float64 on the CPU, flattened per task (lam >= 0). Shapes: -> [D, n], [D, n]."""
    mu, lam = messages.mu[name].detach().cpu().double(), messages.lam[name].detach().cpu().double()
    return mu.flatten(1), lam.clamp_min(0).flatten(1)


def _factor_terms(mu: torch.Tensor, lam: torch.Tensor, tau: torch.Tensor, g: float) -> torch.Tensor:
    """The collapsed log-likelihood of one factor's coordinates at each tau, constants dropped.

    Shapes: mu, lam [D, n], tau [K] -> [K] (float64). ``1/2 log w`` is written as ``-1/2 log1p(lam / tau)``
    (its ``1/2 log lam`` does not depend on tau), so a coordinate a task does not inform (lam = 0) adds nothing.
    Coordinates no task informs are left out (with a flat Theta their integral is improper and constant in tau).
    """
    informed = lam.sum(0) > 0  # [n]
    mu, lam = mu[:, informed], lam[:, informed]
    t = tau.to(lam).view(-1, 1, 1)  # [K, 1, 1]
    w = lam * t / (lam + t)  # [K, D, n]
    total = w.sum(1)  # [K, n]
    theta = (w * mu).sum(1) / (total + g).clamp_min(1e-300)  # [K, n]
    quad = (w * (mu - theta.unsqueeze(1)).square()).sum(1) + g * theta.square()  # [K, n]
    per_coordinate = -0.5 * torch.log1p(lam / t).sum(1) - 0.5 * quad - 0.5 * torch.log(total + g)  # [K, n]
    return per_coordinate.sum(-1)


def _chunks(n: int, budget: int) -> Iterator[slice]:
    step = max(1, budget)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def collapsed_log_likelihood(
    messages: Messages, log_tau: torch.Tensor, names: Sequence[str] | None = None, global_precision: float = 0.0
) -> torch.Tensor:
    """log p(data | tau) on the grid ``log_tau`` [K] from the coordinates of the factors ``names`` (default
    all), constants dropped. -> [K]."""
    tau = log_tau.double().exp()
    out = torch.zeros(len(tau), dtype=torch.float64)
    for name in messages.lam if names is None else names:
        mu, lam = _flat(messages, name)
        budget = max(1, int(1e7 // max(1, mu.numel())))  # grid points per chunk: [K, D, n] in ~80 MB of float64
        for part in _chunks(len(tau), budget):
            out[part] += _factor_terms(mu, lam, tau[part], global_precision)
    return out


@dataclass(frozen=True)
class TauPosterior:
    """The posterior of tau on a grid of log tau, per tau group, and the messages it came from.

    Shapes: ``log_tau`` [groups, K] (each group its own zoomed grid), ``log_likelihood`` [groups, K] (the
    collapsed log p(data | tau), constants dropped), ``log_prior`` [groups, K] (the hyperprior's density of
    log tau). ``density`` is the posterior density of log tau, [groups, K], integrating to 1 on the grid.
    ``group_of``: factor name -> group index; ``global_precision``: Theta's prior precision (0: flat).
    """

    groups: tuple[str, ...]
    log_tau: np.ndarray
    log_likelihood: np.ndarray
    log_prior: np.ndarray
    messages: Messages | None = None
    group_of: Mapping[str, int] | None = None
    global_precision: float = 0.0
    curvature: Mapping[str, torch.Tensor] | None = None  # every coordinate's lam (for shrinkage), if messages dropped
    searched: tuple[float, float] = LOG_TAU_RANGE  # the range of log tau the posterior was looked for in
    label: str | None = None  # how it was made, where no messages say so

    @property
    def source(self) -> str | None:
        """How the messages were made ("fisher-sampled", "fisher-empirical", "guide", ...), or ``label``."""
        return self.label if self.messages is None else self.messages.source

    @property
    def grid(self) -> np.ndarray:
        """The tau values of each group's grid. Shape: [groups, K]."""
        return np.exp(self.log_tau)

    @property
    def log_density(self) -> np.ndarray:
        """Normalised log posterior density of log tau. Shape: [groups, K]."""
        logp = self.log_likelihood + self.log_prior
        logp = logp - logp.max(1, keepdims=True)
        e, gaps = np.exp(logp), np.diff(self.log_tau, axis=1)
        norm = np.log((0.5 * (e[:, 1:] + e[:, :-1]) * gaps).sum(1))  # the trapezoid rule
        return logp - norm[:, None]

    @property
    def density(self) -> np.ndarray:
        """Posterior density of log tau on the grid (integrates to 1 over ``log_tau``). Shape: [groups, K]."""
        return np.exp(self.log_density)

    def weights(self) -> np.ndarray:
        """Probability mass of each grid point (trapezoid rule; each row sums to 1). Shape: [groups, K]."""
        density = self.density
        gaps = np.diff(self.log_tau, axis=1)
        mass = np.zeros_like(density)
        mass[:, 1:] += 0.5 * gaps * density[:, 1:]
        mass[:, :-1] += 0.5 * gaps * density[:, :-1]
        return mass / mass.sum(1, keepdims=True)

    def quantiles(self, probs: Sequence[float] = (0.05, 0.5, 0.95)) -> np.ndarray:
        """Posterior quantiles of tau (the CDF interpolated in log tau). Shape: [groups, len(probs)]."""
        out = np.empty((len(self.groups), len(probs)))
        for g, (log_tau, mass) in enumerate(zip(self.log_tau, self.weights())):
            cdf = np.concatenate([[0.0], np.cumsum(0.5 * (mass[1:] + mass[:-1]))])
            cdf = cdf / cdf[-1]
            out[g] = np.exp(np.interp(np.asarray(probs), cdf, log_tau))
        return out

    def median(self) -> np.ndarray:
        """The posterior median of each group's tau. Shape: [groups]."""
        return self.quantiles((0.5,))[:, 0]

    def with_prior(self, tau_prior: TauPrior) -> TauPosterior:
        """The same evidence under another hyperprior (sensitivity: the grid is reweighted, nothing refitted)."""
        return dataclasses.replace(self, log_prior=log_prior_density(tau_prior, self.log_tau))

    def to_frame(self) -> pd.DataFrame:
        """Long table: group, tau, log_tau, density (of log tau), log_likelihood (collapsed, up to a constant)."""
        density = self.density
        return pd.DataFrame(
            {
                "group": np.repeat(self.groups, self.log_tau.shape[1]),
                "tau": self.grid.ravel(),
                "log_tau": self.log_tau.ravel(),
                "density": density.ravel(),
                "log_likelihood": self.log_likelihood.ravel(),
            }
        )

    def at_edge(self) -> list[bool]:
        """Per group: does the posterior reach an end of the range of log tau searched (``searched``, by default
        [1e-4, 1e9]), with more than e^-25 of its peak density there (its mass continues beyond)?"""
        low, high = self.searched
        logp = self.log_density
        cut = logp.max(1) - KEEP_LOG_DENSITY
        return [
            bool(
                (self.log_tau[g, 0] <= low + 1e-9 and logp[g, 0] > cut[g])
                or (self.log_tau[g, -1] >= high - 1e-9 and logp[g, -1] > cut[g])
            )
            for g in range(len(self.groups))
        ]

    def factor_medians(self) -> dict[str, float]:
        """Each factor's tau at its group's posterior median."""
        median = self.median()
        return {name: float(median[g]) for name, g in self._group_of().items()}

    def mean_factors(self) -> dict[str, torch.Tensor]:
        """E[theta_d | data], tau averaged out (see :func:`averaged_mean`). Shapes: name -> [D, *shape]."""
        return averaged_mean(self._messages(), self, self._group_of(), self.global_precision)

    def draws(self, num_draws: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """Joint draws of every task's factors, tau integrated out (see :func:`averaged_draws`).
        Shapes: -> ``num_draws`` dicts name -> [D, *shape]."""
        return averaged_draws(self._messages(), self, num_draws, seed, self._group_of(), self.global_precision)

    def shrinkage(self, tau: float | Mapping[str, float] | None = None) -> pd.DataFrame:
        """:func:`shrinkage` per task at ``tau`` (default: the posterior median), from every coordinate's lam."""
        return shrinkage(self.every_coordinate(), self.factor_medians() if tau is None else tau)

    def every_coordinate(self) -> Messages:
        """The messages with every coordinate's lam (``curvature``), the dropped ones included."""
        messages = self._messages()
        if self.curvature is None:
            return messages
        return dataclasses.replace(messages, lam=self.curvature)

    def residuals(self, tau: float | Mapping[str, float] | None = None) -> pd.DataFrame:
        """:func:`standardised_residuals` per factor at ``tau`` (default: the posterior median)."""
        tau = self.factor_medians() if tau is None else tau
        return standardised_residuals(self._messages(), tau, self.global_precision)

    def _messages(self) -> Messages:
        if self.messages is None:
            raise ValueError("this posterior was read without its messages (only the grid and density were kept)")
        return self.messages

    def _group_of(self) -> Mapping[str, int]:
        return dict.fromkeys(self._messages().lam, 0) if self.group_of is None else self.group_of

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, tau_prior: TauPrior) -> TauPosterior:
        """Read back :meth:`to_frame` (a run's tau_posterior.csv), under ``tau_prior`` (the run's hyperprior, or
        another one to see how much the answer depends on it), without its messages."""
        groups = tuple(dict.fromkeys(frame.group.astype(str)))
        parts = [frame[frame.group.astype(str) == g] for g in groups]
        if len({len(p) for p in parts}) != 1:
            raise ValueError("every tau group of a tau_posterior table must have a grid of the same length")
        log_tau = np.stack([p.log_tau.to_numpy(dtype=float) for p in parts])
        loglik = np.stack([p.log_likelihood.to_numpy(dtype=float) for p in parts])
        return cls(groups, log_tau, loglik, log_prior_density(tau_prior, log_tau))

    def summary(self) -> dict[str, dict[str, float]]:
        """{group: {"q05", "median", "q95"}} of tau."""
        q = self.quantiles((0.05, 0.5, 0.95))
        return {g: {"q05": float(a), "median": float(b), "q95": float(c)} for g, (a, b, c) in zip(self.groups, q)}


def log_prior_density(tau_prior: TauPrior, log_tau: np.ndarray) -> np.ndarray:
    """log p(log tau) = log p(tau) + log tau of the hyperprior at every grid point (any shape)."""
    tau = torch.as_tensor(np.exp(log_tau), dtype=torch.float64)
    a, b = torch.tensor(tau_prior.a, dtype=torch.float64), torch.tensor(tau_prior.b, dtype=torch.float64)
    if tau_prior.kind == "lognormal":
        logp = torch.distributions.Normal(a, b).log_prob(tau.log())  # log tau ~ Normal: already a density of log tau
    else:
        logp = torch.distributions.Gamma(a, b).log_prob(tau) + tau.log()
    return logp.numpy()


def collapsed_tau_posterior(
    messages: Messages,
    tau_prior: TauPrior,
    group_of: Mapping[str, int] | None = None,
    groups: Sequence[str] = ("all",),
    global_precision: float = 0.0,
    log_tau: torch.Tensor | None = None,
    curvature: Mapping[str, torch.Tensor] | None = None,
) -> TauPosterior:
    """The posterior of tau from ``messages`` (Theta integrated out under a flat prior, or under
    Normal(0, 1/global_precision)); ``group_of``: factor name -> index into ``groups`` (default one tau);
    ``curvature``: every coordinate's lam, kept for :meth:`TauPosterior.shrinkage` when ``messages`` dropped some.

    With ``log_tau`` [K] the posterior is evaluated on that grid. By default each group gets its own grid: a
    coarse one over [1e-4, 1e9] finds the mode, a few parabola steps its curvature, and the final grid of
    121 points spans the mode +- 8 posterior sds of log tau, widened until its ends are e^-25 below the peak
    (with millions of coordinates the posterior is narrow: a fixed grid would not resolve it).
    """
    group_of = dict.fromkeys(messages.lam, 0) if group_of is None else dict(group_of)
    prior = lambda x: torch.as_tensor(log_prior_density(tau_prior, x.numpy()))
    rows = []
    for g in range(len(groups)):
        names = [n for n in messages.lam if group_of[n] == g]

        def loglik(x: torch.Tensor, names: list[str] = names) -> torch.Tensor:
            return collapsed_log_likelihood(messages, x, names, global_precision)

        grid = log_tau.double() if log_tau is not None else _final_grid(lambda x, f=loglik: f(x) + prior(x))
        rows.append((grid, loglik(grid), prior(grid)))
    stack = lambda i: torch.stack([r[i] for r in rows]).numpy()
    return TauPosterior(tuple(groups), stack(0), stack(1), stack(2), messages, group_of, global_precision, curvature)


def _final_grid(log_post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A grid of log tau [FINE_POINTS] holding the posterior's mass (see :func:`collapsed_tau_posterior`): the
    best point of a coarse grid, the mode by golden-section search between its neighbours, the posterior sd of
    log tau from a parabola through points ~1 sd apart, then mode +- 8 sd, widened while an end is above the
    cutoff, and zoomed back onto the points above it."""
    low, high = LOG_TAU_RANGE
    coarse = torch.linspace(low, high, COARSE_POINTS, dtype=torch.float64)
    best = int(log_post(coarse).argmax())
    a, b = float(coarse[max(best - 1, 0)]), float(coarse[min(best + 1, COARSE_POINTS - 1)])
    f = lambda x: float(log_post(torch.tensor([x], dtype=torch.float64))[0])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(GOLDEN_STEPS):  # the bracket shrinks by 0.618 a step: ~1e-6 of the coarse spacing
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    x = (a + b) / 2
    h = (high - low) / COARSE_POINTS
    sd = h
    for _ in range(PEAK_STEPS):  # a parabola through x - h, x, x + h with h shrunk to about one sd
        ys = log_post(torch.tensor([x - h, x, x + h], dtype=torch.float64))
        curvature = float(ys[0] - 2 * ys[1] + ys[2]) / h**2
        if curvature >= 0:  # flat at this scale (a posterior wider than h): look wider
            sd = h
            break
        sd = (-curvature) ** -0.5
        if 0.25 * sd <= h <= 2 * sd:
            break
        h = sd
    left, right = max(x - 8 * sd, low), min(x + 8 * sd, high)
    for _ in range(WIDEN_STEPS):
        grid = torch.linspace(left, right, FINE_POINTS, dtype=torch.float64)
        values = log_post(grid)
        top = float(values.max()) - KEEP_LOG_DENSITY
        wider_left, wider_right = float(values[0]) > top and left > low, float(values[-1]) > top and right < high
        if not (wider_left or wider_right):
            break
        width = right - left
        left, right = max(left - width * wider_left, low), min(right + width * wider_right, high)
    kept = torch.nonzero(values >= top).flatten()
    first, last = int(kept[0]), int(kept[-1])
    if last - first < FINE_POINTS // 4:  # the mass sits on a few points: zoom onto them
        grid = torch.linspace(
            float(grid[max(first - 1, 0)]),
            float(grid[min(last + 1, FINE_POINTS - 1)]),
            FINE_POINTS,
            dtype=torch.float64,
        )
    return grid


def conditional_mean(
    messages: Messages, tau: float | Mapping[str, float], global_precision: float = 0.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """E[Theta | tau, data] and E[theta_d | tau, data] under the messages (``tau``: one value, or one per factor
    name). A coordinate of a task without a message (lam = 0) keeps its point (the fit's value: the messages say
    nothing of it), and Theta where no task informs it the mean of the tasks' points.
    Shapes: -> name -> [*shape], name -> [D, *shape]."""
    thetas, means = {}, {}
    for name, point in messages.point.items():
        tau_n = float(tau[name]) if isinstance(tau, Mapping) else float(tau)
        mu, lam = _flat(messages, name)
        here = point.detach().cpu().double().flatten(1)  # [D, n]
        if math.isinf(tau_n):
            w = lam
        else:
            w = lam * tau_n / (lam + tau_n) if tau_n > 0 else torch.zeros_like(lam)
        total = w.sum(0)
        theta = torch.where(total + global_precision > 0, (w * mu).sum(0) / (total + global_precision), here.mean(0))
        if math.isinf(tau_n):
            mean = torch.where(lam > 0, theta.expand_as(mu), here)
        else:
            mean = torch.where(lam > 0, (lam * mu + tau_n * theta) / (lam + tau_n).clamp_min(1e-30), here)
        thetas[name] = theta.view(point.shape[1:]).float()
        means[name] = mean.reshape(point.shape).float()
    return thetas, means


def averaged_mean(
    messages: Messages,
    posterior: TauPosterior,
    group_of: Mapping[str, int] | None = None,
    global_precision: float = 0.0,
    min_mass: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """E[theta_d | data]: the conditional means averaged over the posterior of tau (grid points with at least
    ``min_mass`` of it, renormalised). Shapes: -> name -> [D, *shape]."""
    group_of = dict.fromkeys(messages.lam, 0) if group_of is None else group_of
    weights, grid = posterior.weights(), posterior.grid
    out = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in messages.point.items()}
    for g in range(len(posterior.groups)):
        kept = weights[g] >= min_mass
        mass = weights[g][kept] / weights[g][kept].sum()
        names = [n for n in messages.point if group_of[n] == g]
        for tau, p in zip(grid[g][kept], mass):
            _, means = conditional_mean(_subset(messages, names), float(tau), global_precision)
            for name in names:
                out[name] += p * means[name].double()
    return {name: out[name].float() for name in out}


def averaged_draws(
    messages: Messages,
    posterior: TauPosterior,
    num_draws: int,
    seed: int = 0,
    group_of: Mapping[str, int] | None = None,
    global_precision: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Joint draws of every task's factors from the collapsed posterior, tau integrated out: per draw, tau from
    the grid's posterior weights (one per group), then Theta_j | tau ~ N(Thetabar_j, 1/(g + sum_d w_dj)) and
    theta_dj | Theta, tau ~ N((lam_dj mu_dj + tau Theta_j) / (lam_dj + tau), 1/(lam_dj + tau)). A coordinate of a
    task without a message keeps its point (as :func:`conditional_mean`). Seeded.
    Shapes: -> ``num_draws`` dicts name -> [D, *shape]."""
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    group_of = dict.fromkeys(messages.lam, 0) if group_of is None else group_of
    generator = torch.Generator().manual_seed(seed)
    weights = torch.as_tensor(posterior.weights(), dtype=torch.float64)  # [groups, K]
    grid = torch.as_tensor(posterior.grid, dtype=torch.float64)
    picks = torch.multinomial(weights, num_draws, replacement=True, generator=generator)  # [groups, S]
    flat = {name: (*_flat(messages, name), p.detach().cpu().double().flatten(1)) for name, p in messages.point.items()}
    draws = []
    for s in range(num_draws):
        draw = {}
        for name, point in messages.point.items():
            g = group_of[name]
            tau = grid[g, picks[g, s]]
            mu, lam, here = flat[name]  # [D, n] each: the messages and the point they were taken at
            w = lam * tau / (lam + tau)
            precision = w.sum(0) + global_precision  # [n]
            informed = precision > 0
            mean = torch.where(informed, (w * mu).sum(0) / precision.clamp_min(1e-300), here.mean(0))
            noise = torch.randn(mean.shape, dtype=torch.float64, generator=generator)
            theta = mean + torch.where(informed, noise / precision.clamp_min(1e-300).sqrt(), torch.zeros_like(mean))
            noise = torch.randn(mu.shape, dtype=torch.float64, generator=generator)
            task = (lam * mu + tau * theta) / (lam + tau) + noise / (lam + tau).sqrt()
            draw[name] = torch.where(lam > 0, task, here).reshape(point.shape).float()
        draws.append(draw)
    return draws


def _subset(messages: Messages, names: Sequence[str]) -> Messages:
    pick = lambda values: {n: values[n] for n in names}
    return dataclasses.replace(messages, mu=pick(messages.mu), lam=pick(messages.lam), point=pick(messages.point))


def shrinkage(messages: Messages, tau: float | Mapping[str, float]) -> pd.DataFrame:
    """How much each task borrows from Theta at ``tau`` (one value, or one per factor name):
    kappa_dj = tau / (lam_dj + tau) (1 at tau = inf, 0 at tau = 0), per task its mean over coordinates
    (``kappa``: the share of its adapter that comes from Theta) and ``p_eff`` = sum_j (1 - kappa_dj), the
    effective number of its own parameters. -> columns kappa, p_eff, one row per task."""
    tau_of = (lambda n: float(tau[n])) if isinstance(tau, Mapping) else (lambda n: float(tau))
    kappa_sum = torch.zeros(messages.num_tasks, dtype=torch.float64)
    for name in messages.lam:
        _, lam = _flat(messages, name)
        t = tau_of(name)
        if math.isinf(t):
            kappa = torch.ones_like(lam)
        elif t == 0:
            kappa = (lam == 0).double()  # a coordinate no data informs (a closed gate) is no parameter of its own
        else:
            kappa = t / (lam + t)
        kappa_sum += kappa.sum(1)
    n = messages.coordinates()
    return pd.DataFrame({"kappa": (kappa_sum / n).numpy(), "p_eff": (n - kappa_sum).numpy()})


def standardised_residuals(
    messages: Messages, tau: float | Mapping[str, float], global_precision: float = 0.0
) -> pd.DataFrame:
    """A posterior predictive check of the Gaussian prior, per factor: r_dj = (mu_dj - Thetabar_j) sqrt(w_dj)
    over the coordinates a task informs (other tasks informing them too), which the model says are about
    N(0, 1) (a little narrower: Thetabar is fitted). -> columns factor, n, mean_square, excess_kurtosis,
    share_beyond_3 (share of |r| > 3; 0.27% under N(0, 1))."""
    rows = []
    for name in messages.lam:
        t = float(tau[name]) if isinstance(tau, Mapping) else float(tau)
        mu, lam = _flat(messages, name)
        if not 0 < t < math.inf:
            continue
        w = lam * t / (lam + t)
        total = w.sum(0)
        theta = (w * mu).sum(0) / (total + global_precision).clamp_min(1e-300)
        usable = (lam > 0) & (total - w > 0)
        r = ((mu - theta) * w.sqrt())[usable]
        if r.numel() < 2:
            continue
        square = (r**2).mean()
        rows.append(
            {
                "factor": name,
                "n": int(r.numel()),
                "mean_square": float(square),
                "excess_kurtosis": float((r**4).mean() / square**2 - 3),
                "share_beyond_3": float((r.abs() > 3).double().mean()),
            }
        )
    return pd.DataFrame(rows, columns=["factor", "n", "mean_square", "excess_kurtosis", "share_beyond_3"])
