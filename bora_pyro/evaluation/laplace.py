"""``tau_posterior_from_fits(fits, data)``: the posterior of tau from MAP fits at several fixed taus (INLA proper).

Each fit is read by one curvature pass over its training documents (``evaluation/messages.py``), which also
measures the height of the log-likelihood there; ``models/laplace_tau.py`` turns each into log p(data | tau) at
its tau and interpolates between them. Fits of a ``sweep`` over tau are what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.batching import Split
from ..data.corpus import Corpus
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior
from ..models.laplace_tau import ConditionalFit, conditional_fit, laplace_tau_posterior
from .messages import SampledLogLikelihood, curvature_messages


def read_conditional_fit(
    bora: BoRA,
    data: Corpus | Split,
    docs_per_task: int | None = None,
    fisher: str = "sampled",
    label_samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    sampled_log_likelihood: SampledLogLikelihood | None = None,
    progress: bool = False,
) -> ConditionalFit:
    """The Laplace terms of ``bora``, a MAP fit at a fixed, finite tau > 0, from the training documents of ``data``
    (at most ``docs_per_task`` of each task, the same ones for every fit with the same ``seed``; their
    log-likelihood is scaled up to all of the task's documents). See :func:`curvature_messages` for the rest."""
    if bora.inference != "map" or bora.prior.learned or bora.mode != "hierarchical":
        raise ValueError(
            f"a Laplace step reads a MAP fit at a fixed, finite tau > 0 (the conditional mode given tau); this run "
            f"is inference={bora.inference!r}, tau={bora.tau!r}"
        )
    split = data.train if isinstance(data, Corpus) else data
    messages = curvature_messages(
        bora,
        split,
        docs_per_task=docs_per_task,
        fisher=fisher,
        label_samples=label_samples,
        gradient="none",
        seed=seed,
        batch_size=batch_size,
        sampled_log_likelihood=sampled_log_likelihood,
        progress=progress,
    )
    log_likelihood = float(messages.log_likelihood.sum())
    theta = bora.global_factors()
    return conditional_fit(
        float(bora.tau), log_likelihood, messages.point, theta, messages.lam, bora.prior.global_precision
    )


def tau_posterior_from_fits(fits: Sequence[BoRA], data: Corpus | Split, **options) -> TauPosterior:
    """The posterior of tau from MAP fits of one model to ``data`` at three or more fixed taus (e.g. a sweep's),
    by Laplace at each fit (:func:`~bora_pyro.models.laplace_tau.laplace_tau_posterior`), under the first fit's
    tau hyperprior. ``options``: :func:`read_conditional_fit`'s. Unlike :func:`tau_posterior` (one fit, one
    expansion for every tau) it does not carry one fit's pooling into the others; it knows nothing beyond the
    smallest and the largest tau fitted (``at_edge()``), and is as good as the fits are converged. Exact on the
    normal hierarchical model; on a LoRA likelihood (the tiny LLaMA) it put tau far above the truth in 20 of 20
    simulated cases, with the whole Gauss-Newton matrix as well (docs/results.md): do not read tau from it there."""
    if not fits:
        raise ValueError("give three or more fits at different taus")
    first = fits[0]
    for bora in fits[1:]:
        if bora.tasks != first.tasks or bora.lora.shapes() != first.lora.shapes():
            raise ValueError("every fit must be of the same tasks and LoRA shapes (one model at different taus)")
    read = [read_conditional_fit(bora, data, **options) for bora in fits]
    return laplace_tau_posterior(read, first.prior.tau_prior)
