"""``tau_posterior(bora, corpus)``: the collapsed posterior of tau of a fitted run (``models/collapsed_tau.py``).

Messages come from one curvature pass over the training documents (any run but a pooled one: MAP, VI, every
finite tau, the independent limit included), or from a VI run's guide.
``refresh`` takes them once more at E[theta_d | tau = the posterior median] (where the Gaussian approximation
matters if the run's own tau is far from the data's) and recomputes the posterior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..data.batching import Split
from ..data.corpus import Corpus
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior, collapsed_tau_posterior, conditional_mean
from .messages import SampledLogLikelihood, curvature_messages, factor_taus, guide_messages

SOURCES = ("curvature", "guide")
WHY_NOT_POOLED = (
    "its tasks share one adapter, so each task's message would be one Newton step from a point that is no task's "
    "mode (on the convergence study this gave tau-averaged adapters of perplexity 2.8e12); fit at a finite tau, or "
    "fit several taus and use tau_posterior_from_fits"
)


def tau_posterior(
    bora: BoRA,
    data: Corpus | Split,
    source: str = "curvature",
    docs_per_task: int | None = 8,
    fisher: str = "sampled",
    label_samples: int = 1,
    gradient: str = "auto",
    refresh: bool = False,
    trust: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    sampled_log_likelihood: SampledLogLikelihood | None = None,
    point: Mapping[str, torch.Tensor] | None = None,
    theta: Mapping[str, torch.Tensor] | None = None,
    taus: Mapping[str, float] | None = None,
    progress: bool = False,
) -> TauPosterior:
    """The posterior of tau (one per tau group of the run's hyperprior) of a fitted ``bora`` from the training
    documents of ``data`` (a corpus, or its training split), under the run's tau hyperprior (``--tau-prior``,
    whatever tau the run was fitted at), with Theta integrated out (under its prior, if latent).

    ``docs_per_task``, ``fisher``, ``label_samples``, ``gradient``: the curvature pass
    (:func:`~bora_pyro.evaluation.messages.curvature_messages`). ``point`` (name -> [D, *shape]), ``theta``
    (name -> [*shape]) and ``taus`` (factor name -> tau): the fit to take the messages at (default the fitted
    model's; a loaded run's saved adapters: :meth:`LoadedRun.tau_posterior`). ``refresh`` re-expands the
    messages once at E[theta_d | tau = the posterior median] (a second curvature pass there). ``trust``: where
    the message's mean is the fit extrapolated by tau (theta_hat - Theta) / lam (the prior gradient, and a VI
    guide's), coordinates with lam < tau are left out of the posterior of tau and keep their fitted value in
    ``mean_factors()``: there the extrapolation amplifies the fit's deviation by tau / lam > 1, and optimiser
    drift of an unconverged fit reads as task-to-task spread. Which coordinates a task informs does not depend
    on its deviations, so leaving some out loses information but biases nothing (exact for a Gaussian
    likelihood); shrinkage (kappa, p_eff) is computed from every coordinate.

    Returns a :class:`TauPosterior`: ``.grid`` (tau), ``.density`` (of log tau), ``.quantiles(probs)``,
    ``.mean_factors()`` (the tau-averaged posterior mean of every task's factors), ``.shrinkage()``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    fitted_taus = factor_taus(bora) if taus is None else dict(taus)
    if all(math.isinf(t) for t in fitted_taus.values()):
        raise ValueError(f"a pooled fit (tau = inf) gives no collapsed posterior of tau: {WHY_NOT_POOLED}")
    split = data.train if isinstance(data, Corpus) else data
    options = dict(
        docs_per_task=docs_per_task,
        fisher=fisher,
        label_samples=label_samples,
        seed=seed,
        batch_size=batch_size,
        sampled_log_likelihood=sampled_log_likelihood,
        progress=progress,
        taus=taus,
    )
    if source == "guide":
        messages = guide_messages(bora)
    else:
        messages = curvature_messages(bora, split, point=point, theta=theta, gradient=gradient, **options)
    extrapolated = source == "guide" or "gradient-prior" in messages.source
    floor = {k: (t if extrapolated and trust and math.isfinite(t) else 0.0) for k, t in fitted_taus.items()}
    full, messages = messages, messages.restricted(floor)
    names = list(bora.lora.shapes())
    tau_prior = bora.prior.tau_prior
    groups = tau_prior.group_names(names)
    group_of = tau_prior.group_index(names)
    precision = bora.prior.global_precision
    posterior = collapsed_tau_posterior(messages, tau_prior, group_of, groups, precision, curvature=full.lam)
    if refresh:
        _, moved = conditional_mean(messages, posterior.factor_medians(), precision)
        if "gradient-data" in messages.source:  # measured again there, with its noise
            messages = curvature_messages(bora, split, point=moved, gradient="data", **options)
        else:
            there = curvature_messages(bora, split, point=moved, gradient="none", **options)
            messages = messages.recentred(moved, there.lam)
        posterior = collapsed_tau_posterior(messages, tau_prior, group_of, groups, precision, curvature=full.lam)
    return posterior
