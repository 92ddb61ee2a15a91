"""The posterior of tau by Laplace at each tau's own conditional mode (INLA proper), from fits at several taus.

The collapsed posterior (``collapsed_tau.py``) expands every task's log-likelihood once, at one fit, and
carries that fit's pooling into every tau of its grid; on a LoRA likelihood (a product B A, far from quadratic
over the distance between a shrunk fit and the truth) that biases tau upwards. INLA instead expands at the
conditional mode of x = (theta_1..D, Theta) *given each tau*, which is what a MAP fit at that fixed tau is:

    log p(data | tau) ~ log p(data, x_hat(tau) | tau) - 1/2 log det H(tau) + const,

with H the negative Hessian of the joint at x_hat. With a diagonal curvature lam_dj of the likelihood (the
Fisher at the fit) and the prior theta_dj ~ N(Theta_j, 1/tau), per coordinate j
det H_j = prod_d (lam_dj + tau) * (g + sum_d w_dj), w_dj = lam_dj tau / (lam_dj + tau), so

    log p(data | tau) ~ L(theta_hat) + sum_j [ sum_d ( -1/2 log(1 + lam_dj / tau) - 1/2 tau (th_dj - Th_j)^2 )
                        - 1/2 g Th_j^2 - 1/2 log (g + sum_d w_dj) ],

th and Th the fitted theta_hat and Theta_hat, L the training log-likelihood at the fit, g Theta's prior
precision (0: flat). Exact for a Gaussian likelihood at exact modes. Each fit gives one point of log p(data |
tau); between the fits the log evidence is interpolated in log tau (a cubic spline), so the answer is as good
as the fits are converged and as fine as their taus are spaced, and nothing is known beyond the smallest and
largest tau fitted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from .collapsed_tau import FINE_POINTS, TauPosterior, log_prior_density
from .tau_prior import TauPrior

MIN_FITS = 3


@dataclass(frozen=True)
class ConditionalFit:
    """What the Laplace step needs of one MAP fit at a fixed tau: ``log_likelihood`` (the training documents'
    summed log-likelihood at the fit, an estimate when only some documents were read), ``log_prior_curvature``
    (the rest of the Laplace log evidence, see the module docstring) and ``coordinates`` (how many coordinates
    some task informs: fits are comparable only over the same ones)."""

    tau: float
    log_likelihood: float
    log_prior_curvature: float
    coordinates: int

    @property
    def log_evidence(self) -> float:
        """log p(data | tau) by Laplace at this fit, up to a constant shared by fits of the same data."""
        return self.log_likelihood + self.log_prior_curvature

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> ConditionalFit:
        return cls(
            float(values["tau"]),
            float(values["log_likelihood"]),
            float(values["log_prior_curvature"]),
            int(values["coordinates"]),
        )


def conditional_fit(
    tau: float,
    log_likelihood: float,
    point: Mapping[str, torch.Tensor],
    theta: Mapping[str, torch.Tensor],
    lam: Mapping[str, torch.Tensor],
    global_precision: float = 0.0,
) -> ConditionalFit:
    """The Laplace terms of a MAP fit at ``tau`` (finite, > 0): ``point`` (the task factors, name -> [D, *shape]),
    ``theta`` (Theta, name -> [*shape]), ``lam`` (the likelihood's diagonal curvature at ``point``,
    name -> [D, *shape], >= 0). Coordinates no task informs (sum_d lam_dj = 0) are left out."""
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"a Laplace step needs a MAP fit at a finite tau > 0, got tau = {tau}")
    g, total, coordinates = float(global_precision), 0.0, 0
    for name, p in point.items():
        p64 = p.detach().double().cpu().flatten(1)  # [D, n]
        l64 = lam[name].detach().double().cpu().clamp_min(0).flatten(1)  # [D, n]
        t64 = theta[name].detach().double().cpu().flatten()  # [n]
        informed = l64.sum(0) > 0
        p64, l64, t64 = p64[:, informed], l64[:, informed], t64[informed]
        w = l64 * tau / (l64 + tau)
        total += float(
            -0.5 * torch.log1p(l64 / tau).sum()
            - 0.5 * tau * (p64 - t64).square().sum()
            - 0.5 * g * t64.square().sum()
            - 0.5 * torch.log(g + w.sum(0)).sum()
        )
        coordinates += int(informed.sum())
    return ConditionalFit(float(tau), float(log_likelihood), total, coordinates)


def laplace_tau_posterior(fits: Sequence[ConditionalFit], tau_prior: TauPrior) -> TauPosterior:
    """The posterior of one shared tau from MAP fits of the same data and model at >= 3 different taus: each
    fit's Laplace log evidence, interpolated in log tau between the fits (a cubic spline), times the
    hyperprior. Its grid spans the fitted taus only; ``at_edge()`` says when the mass reaches an end of it."""
    if len(fits) < MIN_FITS:
        raise ValueError(f"the Laplace posterior of tau needs fits at {MIN_FITS} or more taus, got {len(fits)}")
    fits = sorted(fits, key=lambda f: f.tau)
    taus = [f.tau for f in fits]
    if len(set(taus)) != len(taus):
        raise ValueError(f"every fit must be at a different tau, got taus {taus}")
    if len({f.coordinates for f in fits}) != 1:
        counts = {f.tau: f.coordinates for f in fits}
        raise ValueError(f"the fits inform different coordinates (tau: count {counts}): not fits of the same model")
    log_tau = np.log(taus)
    evidence = CubicSpline(log_tau, [f.log_evidence for f in fits])
    grid = np.linspace(log_tau[0], log_tau[-1], FINE_POINTS)[None]  # [1, K]
    return TauPosterior(
        ("all",),
        grid,
        evidence(grid),
        log_prior_density(tau_prior, grid),
        searched=(float(log_tau[0]), float(log_tau[-1])),
        label="laplace at each fit",
    )
