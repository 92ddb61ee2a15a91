"""Gaussian messages of each task's log-likelihood (``models/collapsed_tau.py``), taken from a fitted run.

Curvature pass (any run, MAP or VI): at the fitted task factors theta_hat, for each task a diagonal Fisher
lam_dj of its training log-likelihood, and the Newton message mu_dj = theta_hat_dj + grad_dj / lam_dj with the
gradient the fit's stationarity implies (grad_d = tau (theta_hat_d - Theta), exact at a converged MAP) or, for
a pooled run, the measured one with its sampling noise added to the message. Per-document gradients come from
batches holding at most one document of each task: in the multi-task forward, row d of a factor's gradient is
then that one document's. The Fisher is estimated with labels drawn from the model (``fisher="sampled"``:
unbiased for the Gauss-Newton diagonal of a softmax likelihood) or with the data's own labels
(``"empirical"``), from at most ``docs_per_task`` documents of each task, scaled to its whole training set.

Guide (a mean-field VI run, no extra LM pass): q(theta_dj) = N(m, s^2) is the exact conditional posterior
when the likelihood is Gaussian, 1/s^2 = lam + tau and m = (lam mu + tau Theta) / (lam + tau), so
lam = 1/s^2 - tau and mu = m + tau (m - Theta) / lam. Trustworthy only once the guide's scales have converged.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batching import IGNORE_INDEX, Batch, Split
from ..models.bora import BoRA
from ..models.collapsed_tau import Messages
from ..models.likelihood import lm_logits, token_log_probs
from ..models.tau_prior import TAU_SITE

FISHER = ("sampled", "empirical")
# (factors, batch, generator) -> [samples, batch]: log-likelihood of labels drawn from the model
SampledLogLikelihood = Callable[[Mapping[str, torch.Tensor], Batch, torch.Generator], torch.Tensor]


def custom_likelihood(bora: BoRA) -> bool:
    """Whether ``bora`` scores with a swapped-in log-likelihood rather than its language model's."""
    return bora.log_likelihood != bora._lm_log_likelihood


def one_per_task_batches(split: Split, docs_per_task: int | None, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of document indices holding at most one document of each task: round k takes the k-th of
    each task's (seeded, shuffled) documents, at most ``docs_per_task`` of them (None: all), cut into batches."""
    rng = np.random.default_rng(seed)
    task_index = np.asarray(split.task_index)
    chosen = [rng.permutation(np.flatnonzero(task_index == d))[:docs_per_task] for d in range(len(split.tasks))]
    rounds = max((len(c) for c in chosen), default=0)
    for k in range(rounds):
        docs = [int(c[k]) for c in chosen if len(c) > k]
        for start in range(0, len(docs), batch_size):
            yield docs[start : start + batch_size]


def chosen_counts(split: Split, docs_per_task: int | None) -> np.ndarray:
    """How many documents of each task the curvature pass reads. Shape: [tasks]."""
    n = split.docs_per_task()
    return n if docs_per_task is None else np.minimum(n, docs_per_task)


def draw_labels(logits: torch.Tensor, labels: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """Log-probability of ``samples`` label sequences drawn from the model's own next-token distribution at the
    scored positions. Shapes: logits [batch, tokens, vocab], labels [batch, tokens] -> [samples, batch]."""
    logp = logits[:, :-1].float().log_softmax(-1)  # [batch, tokens-1, vocab]
    scored = labels[:, 1:] != IGNORE_INDEX
    drawn = torch.multinomial(logp.detach().exp().flatten(0, 1), samples, replacement=True, generator=generator)
    drawn = drawn.T.reshape(samples, *scored.shape)  # [samples, batch, tokens-1], drawn where the logits are
    picked = logp.unsqueeze(0).expand(samples, -1, -1, -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def _log_likelihoods(
    bora: BoRA,
    rows: Mapping[str, torch.Tensor],
    batch: Batch,
    tasks: torch.Tensor,
    samples: int,
    generator: torch.Generator,
    sampled: SampledLogLikelihood | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The data's log-likelihood [batch] and, with ``samples`` > 0, that of labels drawn from the model
    [samples, batch] (the LM's from one forward; a custom likelihood's from ``sampled``). ``batch``'s task
    index is local (example i uses row i of ``rows``); ``tasks`` [batch] are the real ids (for gates)."""
    if custom_likelihood(bora):
        return bora.log_likelihood(rows, batch), sampled(rows, batch, generator) if samples else None
    logits = lm_logits(bora.lora, rows, batch, bora.gate_values(tasks))
    data = token_log_probs(logits, batch.labels).sum(-1)
    return data, draw_labels(logits, batch.labels, samples, generator) if samples else None


GRADIENTS = ("auto", "prior", "data", "none")


def curvature_messages(
    bora: BoRA,
    split: Split,
    docs_per_task: int | None = 8,
    fisher: str = "sampled",
    label_samples: int = 1,
    gradient: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    point: Mapping[str, torch.Tensor] | None = None,
    theta: Mapping[str, torch.Tensor] | None = None,
    taus: Mapping[str, float] | None = None,
    sampled_log_likelihood: SampledLogLikelihood | None = None,
    progress: bool = False,
) -> Messages:
    """Messages from one curvature pass over ``split`` (the training documents) at ``point`` (name ->
    [D, *shape]; default the fitted point estimate ``bora.task_factors()``).

    lam: ``fisher="sampled"`` draws ``label_samples`` label sequences per document from the model (an LM run,
    or ``sampled_log_likelihood`` for a custom likelihood); ``"empirical"`` squares the data's own
    per-document gradients. A coordinate whose Fisher is 0 gets lam = 0 (no message). Gates, if any, apply.

    mu = point + grad / lam, with the gradient of each task's log-likelihood at the point:
    ``"prior"``: the one the fit's stationarity implies, grad_d = tau (theta_d - Theta) (0 at tau = 0): exact at
    a converged MAP, and no estimate of it is needed (``theta``: Theta, default the fitted one; ``taus``: tau
    per factor, default :func:`factor_taus`); ``"data"``: measured on the same documents, and since it is
    scaled up from ``docs_per_task`` of a task's N_d documents, its sampling variance Var(grad) / lam^2 is added
    to the message's (lam becomes 1 / (1/lam + Var(grad) / lam^2)): a noisy gradient must not read as
    task-to-task spread; ``"none"``: mu = point (the curvature alone); ``"auto"``: "data" when every task's
    documents are read (the measured gradient is then exact, converged fit or not) or for a pooled run (tau =
    inf: the prior implies no task's gradient), else "prior".

    With the prior gradient the measured one is compared with it: ``Messages.stationarity`` is the mean over
    the coordinates with lam >= tau of (measured - implied)^2 / (its sampling variance), about 1 at a converged
    fit; far above 1, the fit has not converged and the messages (which assume it has) misplace the tasks'
    likelihoods.
    """
    if fisher not in FISHER:
        raise ValueError(f"fisher must be one of {FISHER}, got {fisher!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if docs_per_task is not None and docs_per_task < 1:
        raise ValueError(f"docs_per_task must be >= 1 or None, got {docs_per_task}")
    if fisher == "sampled" and label_samples < 1:
        raise ValueError(f"label_samples must be >= 1 for fisher='sampled', got {label_samples}")
    if fisher == "sampled" and custom_likelihood(bora) and sampled_log_likelihood is None:
        raise ValueError(
            "fisher='sampled' draws labels from the model: give sampled_log_likelihood for a custom "
            "log_likelihood, or use fisher='empirical'"
        )
    taus = factor_taus(bora) if taus is None else dict(taus)
    if gradient == "auto":
        every = bool((chosen_counts(split, docs_per_task) == split.docs_per_task()).all())
        gradient = "data" if every or all(math.isinf(t) for t in taus.values()) else "prior"
    if gradient == "prior" and any(math.isinf(t) for t in taus.values()):
        raise ValueError("gradient='prior' needs a finite tau: a pooled run's tasks have no gradient of their own")
    point = {k: v.to(bora.device) for k, v in (bora.task_factors() if point is None else point).items()}
    needs_data = gradient in ("data", "prior") or fisher == "empirical"
    options = (docs_per_task, fisher, label_samples, seed, batch_size, sampled_log_likelihood, needs_data, progress)
    sums = _curvature_pass(bora, split, point, *options)
    n = torch.as_tensor(split.docs_per_task(), dtype=torch.float64)
    m = torch.as_tensor(chosen_counts(split, docs_per_task), dtype=torch.float64)
    if gradient == "prior" and theta is None:
        theta = bora.global_factors()
    mu, lam, misfit, counted = {}, {}, 0.0, 0
    for k, p in point.items():
        shape = (-1, *([1] * (p.dim() - 1)))
        nk, mk = n.to(p.device).view(shape), m.to(p.device).clamp_min(1).view(shape)
        implied = None  # the prior gradient tau (theta_d - Theta), 0 at tau = 0
        if gradient == "prior":
            implied = taus[k] * (p.double() - theta[k].to(p).double()) if taus[k] else torch.zeros_like(p.double())
        mu[k], lam[k], checks = _factor_message(sums, k, p.double(), nk, mk, gradient, implied, taus[k])
        misfit, counted = misfit + checks[0], counted + checks[1]
    return Messages(
        {k: v.float().cpu() for k, v in mu.items()},
        {k: v.float().cpu() for k, v in lam.items()},
        {k: v.detach().cpu() for k, v in point.items()},
        f"fisher-{fisher}, gradient-{gradient}",
        misfit / counted if counted else None,
        sums.log_likelihood.cpu() * n / m.clamp_min(1),
    )


def _factor_message(
    sums: _Sums,
    name: str,
    point: torch.Tensor,
    n: torch.Tensor,
    m: torch.Tensor,
    gradient: str,
    implied: torch.Tensor | None,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, int]]:
    """One factor's message from the pass's sums (see :func:`curvature_messages`): mu, lam and, for the prior
    gradient ``implied``, the (misfit, coordinates) of the stationarity check. ``n``, ``m``: every task's
    documents and those read, shaped to broadcast. Shapes: point [D, *shape] -> mu, lam [D, *shape]."""
    lam = sums.fisher[name] * n / m
    if gradient == "none":
        return point, lam, (0.0, 0)
    measured = sums.grad[name] * n / m
    unbiased = (sums.grad_square[name] - sums.grad[name] ** 2 / m) / (m - 1).clamp_min(1)
    spread = torch.where(m > 1, unbiased, sums.grad_square[name])  # one document: its square, an upper bound
    noise = n**2 * (1 - m / n) * spread.clamp_min(0) / m  # variance of the scaled-up gradient
    grad, checks = measured, (0.0, 0)
    if implied is not None:
        grad = implied
        checked = (lam >= tau) & (noise > 0)  # the coordinates the posterior of tau will use
        checks = (float(((measured - grad) ** 2 / noise.clamp_min(1e-300))[checked].sum()), int(checked.sum()))
    mu = torch.where(lam > 0, point + grad / lam.clamp_min(1e-300), point)
    if implied is None:  # a measured gradient: mu's variance widened by its sampling noise
        lam = torch.where(lam > 0, lam**2 / (lam + noise), lam)
    return mu, lam, checks


@dataclass(frozen=True)
class _Sums:
    """Per task and coordinate, over the documents read: the Fisher's sum, the gradient's sum and its squares'
    sum. Shapes: name -> [D, *shape] (float64)."""

    fisher: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]
    grad_square: dict[str, torch.Tensor]
    log_likelihood: torch.Tensor  # [D]: the data's log-likelihood summed over the documents read


def _curvature_pass(
    bora: BoRA,
    split: Split,
    point: Mapping[str, torch.Tensor],
    docs_per_task: int | None,
    fisher: str,
    label_samples: int,
    seed: int,
    batch_size: int,
    sampled: SampledLogLikelihood | None,
    needs_data: bool,
    progress: bool,
) -> _Sums:
    """One pass over at most ``docs_per_task`` documents of each task, in batches of at most one document per
    task (row d of a factor's gradient is then that document's): see :func:`curvature_messages`.
    ``needs_data``: also the data's own per-document gradients (the sampled Fisher alone needs one backward
    pass per label draw, not that one)."""
    samples = label_samples if fisher == "sampled" else 0
    zeros = lambda: {k: torch.zeros_like(v, dtype=torch.float64) for k, v in point.items()}
    sums = _Sums(zeros(), zeros(), zeros(), torch.zeros(len(split.tasks), dtype=torch.float64, device=bora.device))
    generator = torch.Generator(device=bora.device).manual_seed(seed)
    batches = list(one_per_task_batches(split, docs_per_task, batch_size, seed))
    for docs in tqdm(batches, desc="curvature", unit="batch", disable=not progress, leave=False):
        batch = split.collate(docs).to(bora.device)
        tasks = batch.task_index
        rows = {k: v.index_select(0, tasks).detach().requires_grad_() for k, v in point.items()}
        local = batch.replace(task_index=torch.arange(len(docs), device=bora.device))
        with torch.enable_grad():
            data, drawn = _log_likelihoods(bora, rows, local, tasks, samples, generator, sampled)
            leaves = list(rows.values())
            data_grads = [torch.zeros_like(v, dtype=torch.float64) for v in leaves]
            if needs_data:
                grads = torch.autograd.grad(data.sum(), leaves, retain_graph=drawn is not None)
                data_grads = [g.double() for g in grads]
            squares = [g**2 for g in data_grads]  # the empirical Fisher
            if drawn is not None:  # the sampled Fisher: mean over draws of the squared gradients
                squares = [torch.zeros_like(s) for s in squares]
                for i in range(samples):
                    for k, g in enumerate(torch.autograd.grad(drawn[i].sum(), leaves, retain_graph=i + 1 < samples)):
                        squares[k] += g.double() ** 2 / samples
        sums.log_likelihood.index_add_(0, tasks, data.detach().double())
        for k, g, sq in zip(rows, data_grads, squares):
            sums.grad[k].index_add_(0, tasks, g)
            sums.grad_square[k].index_add_(0, tasks, g**2)
            sums.fisher[k].index_add_(0, tasks, sq)
    return sums


def guide_moments(bora: BoRA) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The mean-field guide's mean and sd of every task factor in theta space (non-centred: theta = Theta +
    tau^-1/2 z, at the run's tau or a learned tau's median). Shapes: -> name -> [D, *shape] twice (float64)."""
    if bora.inference != "vi":
        raise ValueError(f"the guide's moments need a VI run (--inference vi), this one is {bora.inference!r}")
    if bora.mode != "hierarchical":
        raise ValueError(f"the guide's moments need a finite tau > 0 or a learned one; tau is {bora.tau!r}")
    theta, taus = bora.global_factors(), factor_taus(bora)
    locs, scales = {}, {}
    with bora.param_scope():
        for name in theta:
            site = f"task.{name}" + ("_decentered" if bora.prior.noncentered else "")
            loc = operator.attrgetter(f"locs.{site}")(bora.guide).detach().double()
            scale = operator.attrgetter(f"scales.{site}")(bora.guide).detach().double()
            if bora.prior.noncentered:
                loc, scale = theta[name].double() + loc / math.sqrt(taus[name]), scale / math.sqrt(taus[name])
            locs[name], scales[name] = loc, scale
    return locs, scales


def guide_messages(bora: BoRA) -> Messages:
    """Messages read from a fitted mean-field VI guide at its tau (a learned tau: its median); see the module
    docstring. A coordinate whose guide is no narrower than its prior gets lam = 0."""
    locs, scales = guide_moments(bora)
    theta, taus = bora.global_factors(), factor_taus(bora)
    mu, lam = {}, {}
    for name, loc in locs.items():
        tau = taus[name]
        lam[name] = (1.0 / scales[name] ** 2 - tau).clamp_min(0)
        step = tau * (loc - theta[name].double()) / lam[name].clamp_min(1e-300)
        mu[name] = torch.where(lam[name] > 0, loc + step, loc)
    cpu = lambda d: {k: v.float().cpu() for k, v in d.items()}
    return Messages(cpu(mu), cpu(lam), cpu(locs), "guide")


def factor_taus(bora: BoRA) -> dict[str, float]:
    """The tau of every factor: the run's fixed tau, or a learned tau's guide median (by tau group)."""
    names = list(bora.lora.shapes())
    if not bora.prior.learned:
        tau = float(bora.tau)
        return dict.fromkeys(names, tau)
    with bora.param_scope():
        median = bora.guide.median()[TAU_SITE]  # [groups]
    group = bora.prior.tau_prior.group_index(names)
    return {n: float(median[group[n]]) for n in names}
