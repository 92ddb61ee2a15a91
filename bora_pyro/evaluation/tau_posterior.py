"""``tau_posterior(bora, corpus)``: the collapsed posterior of tau of a fitted run (``models/collapsed_tau.py``).

Messages come from one curvature pass over the training documents (any run: MAP, VI, every tau, the
pooled and independent limits included, since messages do not depend on tau), or from a VI run's guide.
``refresh`` takes them once more at E[theta_d | tau = the posterior median] (where the Gaussian approximation
matters if the run's own tau is far from the data's) and recomputes the posterior.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..data.batching import Split
from ..data.corpus import Corpus
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior, collapsed_tau_posterior, conditional_mean
from .messages import SampledLogLikelihood, curvature_messages, guide_messages

SOURCES = ("curvature", "guide")


def tau_posterior(
    bora: BoRA,
    data: Corpus | Split,
    source: str = "curvature",
    docs_per_task: int | None = 32,
    fisher: str = "sampled",
    label_samples: int = 1,
    refresh: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    sampled_log_likelihood: SampledLogLikelihood | None = None,
    point: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> TauPosterior:
    """The posterior of tau (one per tau group of the run's hyperprior) of a fitted ``bora`` from the training
    documents of ``data`` (a corpus, or its training split), under the run's tau hyperprior (``--tau-prior``,
    whatever tau the run was fitted at), with Theta integrated out (under its prior, if latent).

    ``point`` (name -> [D, *shape]): the task factors to take the messages at (default the fitted point
    estimate; a loaded run's saved adapters: :meth:`LoadedRun.tau_posterior`). ``refresh`` takes them again at
    E[theta_d | tau = the posterior median] (always by a curvature pass).

    Returns a :class:`TauPosterior`: ``.grid`` (tau), ``.density`` (of log tau), ``.quantiles(probs)``,
    ``.mean_factors()`` (the tau-averaged posterior mean of every task's factors), ``.shrinkage()``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    split = data.train if isinstance(data, Corpus) else data
    options = dict(
        docs_per_task=docs_per_task,
        fisher=fisher,
        label_samples=label_samples,
        seed=seed,
        batch_size=batch_size,
        sampled_log_likelihood=sampled_log_likelihood,
        progress=progress,
    )
    if source == "guide":
        messages = guide_messages(bora)
    else:
        messages = curvature_messages(bora, split, point=point, **options)
    names = list(bora.lora.shapes())
    tau_prior = bora.prior.tau_prior
    groups = tau_prior.group_names(names)
    group_of = tau_prior.group_index(names)
    scale = bora.prior.global_scale
    precision = 0.0 if scale is None or not bora.prior.latent_global else scale**-2.0
    posterior = collapsed_tau_posterior(messages, tau_prior, group_of, groups, precision)
    if refresh:
        _, point = conditional_mean(messages, posterior.factor_medians(), precision)
        messages = curvature_messages(bora, split, point=point, **options)
        posterior = collapsed_tau_posterior(messages, tau_prior, group_of, groups, precision)
    return posterior
