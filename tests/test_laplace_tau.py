"""The posterior of tau by Laplace at each tau's own MAP fit (INLA proper): exact on the normal hierarchical
model, read from real fits, and its refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bora_pyro
from bora_pyro import PriorConfig
from bora_pyro.evaluation.laplace import read_conditional_fit, tau_posterior_from_fits
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.models.collapsed_tau import log_prior_density
from bora_pyro.models.laplace_tau import ConditionalFit, conditional_fit, laplace_tau_posterior
from bora_pyro.models.tau_prior import TauPrior

from .gaussian_oracle import GaussianObservations, observation_corpus

PRIOR = TauPrior.parse("lognormal:2.3,3")
SIGMA = 0.5
DOCS = [2 + (3 * d) % 9 for d in range(10)]  # 2..10 observations per task
TAUS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _simulated(shapes, tau: float = 4.0, seed: int = 1) -> GaussianObservations:
    return GaussianObservations.simulate(
        shapes, DOCS, tau=tau, sigma=SIGMA, generator=torch.Generator().manual_seed(seed)
    )


def _exact_mode(data: GaussianObservations, tau: float) -> ConditionalFit:
    """The conditional mode of (theta_d, Theta) given tau in closed form (Theta flat), and its Laplace terms."""
    n = torch.tensor(DOCS, dtype=torch.float64)
    lam_d = n / SIGMA**2  # [D]
    w = lam_d * tau / (lam_d + tau)
    point, theta, lam, loglik = {}, {}, {}, 0.0
    for k, y in data.y.items():
        ybar = torch.stack([y[data.task_index == d].mean(0) for d in range(len(DOCS))]).double()  # [D, *shape]
        shape = (-1, *[1] * (ybar.dim() - 1))
        theta[k] = (w.view(shape) * ybar).sum(0) / w.sum()
        point[k] = (lam_d.view(shape) * ybar + tau * theta[k]) / (lam_d + tau).view(shape)
        lam[k] = lam_d.view(shape).expand_as(ybar)
        loglik += float((-0.5 * (y.double() - point[k][data.task_index]) ** 2 / SIGMA**2).sum())
    return conditional_fit(tau, loglik, point, theta, lam)


def test_laplace_at_exact_modes_is_the_exact_evidence_of_the_normal_hierarchical_model():
    data = _simulated({"a": (3, 4), "b": (5,)})
    log_tau = torch.log(torch.tensor(TAUS, dtype=torch.float64))
    fits = [_exact_mode(data, tau) for tau in TAUS]
    exact = data.tau_posterior(PRIOR, log_tau, "integrated").double().log().numpy()  # log p(tau | y) + const
    exact_evidence = exact - log_prior_density(PRIOR, log_tau.numpy())
    ours = np.array([f.log_evidence for f in fits])
    assert ours - ours[0] == pytest.approx(exact_evidence - exact_evidence[0], abs=1e-4)


def test_laplace_posterior_interpolates_between_fits_and_says_when_its_mass_leaves_them():
    data = _simulated({"a": (3, 4), "b": (5,)})
    fine = torch.linspace(math.log(TAUS[0]), math.log(TAUS[-1]), 800)
    cdf = np.cumsum(data.tau_posterior(PRIOR, fine, "integrated").numpy())
    exact = np.exp(np.interp([0.05, 0.5, 0.95], cdf / cdf[-1], fine.numpy()))
    posterior = laplace_tau_posterior([_exact_mode(data, tau) for tau in TAUS], PRIOR)
    assert posterior.quantiles()[0] == pytest.approx(exact, rel=0.03)  # 7 fits a factor 2 apart
    assert posterior.at_edge() == [False]
    assert posterior.source == "laplace at each fit"
    too_small = laplace_tau_posterior([_exact_mode(data, tau) for tau in (0.05, 0.1, 0.2)], PRIOR)
    assert too_small.at_edge() == [True]  # the data's tau lies above the largest fitted


def _gaussian_bora(tau: float, data: GaussianObservations | None = None):
    """A fresh BoRA at ``tau`` whose likelihood is Gaussian observations (simulated, or ``data``)."""
    corpus = observation_corpus(DOCS)
    prior = PriorConfig(tau=tau, tau_prior="lognormal:2.3,3")
    lm = tiny_random_llama()[0]
    bora = bora_pyro.BoRA(lm, corpus.tasks, rank=1, alpha=1, targets=["q_proj"], prior=prior)
    data = data or _simulated(bora.lora.shapes())
    bora.log_likelihood = data.log_likelihood
    return bora, corpus, data


def test_laplace_from_map_fits_recovers_the_exact_posterior():
    """BoRA fitted by MAP at five taus to Gaussian observations, read by the sampled-Fisher curvature pass."""
    _, corpus, data = _gaussian_bora(1.0)
    taus = (1.0, 2.5, 6.0, 15.0, 40.0)
    fits = []
    for tau in taus:
        bora, _, _ = _gaussian_bora(tau, data)
        options = dict(batch_size=sum(DOCS), lr=0.03, clip_norm=None, lr_schedule="cosine", progress=False)
        bora_pyro.fit(bora, corpus, steps=300, eval_every=300, **options)
        fits.append(bora)
    sampled = dict(label_samples=32, sampled_log_likelihood=data.sampled_log_likelihood(32))
    posterior = tau_posterior_from_fits(fits, corpus, **sampled)
    fine = torch.linspace(math.log(taus[0]), math.log(taus[-1]), 800)
    cdf = np.cumsum(data.tau_posterior(PRIOR, fine, "integrated").numpy())
    exact = np.exp(np.interp([0.05, 0.5, 0.95], cdf / cdf[-1], fine.numpy()))
    assert posterior.quantiles()[0] == pytest.approx(exact, rel=0.03)
    one = read_conditional_fit(fits[2], corpus, **sampled)
    half = read_conditional_fit(fits[2], corpus, docs_per_task=5, seed=3, **sampled)  # scaled up from 5 of 2..10
    assert half.log_likelihood == pytest.approx(one.log_likelihood, rel=0.3)


def test_laplace_refuses_what_is_not_a_set_of_conditional_modes():
    data = _simulated({"a": (3,)})
    fits = [_exact_mode(data, tau) for tau in (1.0, 2.0, 4.0)]
    with pytest.raises(ValueError, match="3 or more taus, got 2"):
        laplace_tau_posterior(fits[:2], PRIOR)
    with pytest.raises(ValueError, match="different tau"):
        laplace_tau_posterior([fits[0], fits[0], fits[1]], PRIOR)
    other = _simulated({"a": (4,)})
    with pytest.raises(ValueError, match="inform different coordinates"):
        laplace_tau_posterior([*fits[:2], _exact_mode(other, 8.0)], PRIOR)
    with pytest.raises(ValueError, match="finite tau > 0, got tau = inf"):
        conditional_fit(math.inf, 0.0, {}, {}, {})
    for prior, inference in (
        (PriorConfig(tau=4.0), "vi"),
        (PriorConfig(tau="learn"), "vi"),
        (PriorConfig(tau=0), "map"),
    ):
        corpus = observation_corpus(DOCS)
        bora = bora_pyro.BoRA(
            tiny_random_llama()[0], corpus.tasks, rank=1, targets=["q_proj"], prior=prior, inference=inference
        )
        with pytest.raises(ValueError, match="a Laplace step reads a MAP fit at a fixed, finite tau > 0"):
            read_conditional_fit(bora, corpus)
    assert ConditionalFit.from_dict(fits[0].to_dict()) == fits[0]
