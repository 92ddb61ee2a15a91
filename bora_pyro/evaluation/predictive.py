"""Posterior draws, posterior-predictive perplexity and calibration of next-token probabilities.

Posterior predictive of a document: p(doc | data) ~= mean_s p(doc | theta_s) over S guide draws,
computed as a log-mean-exp of per-draw document log-likelihoods. With an AutoDelta guide every
draw is the MAP, so it equals the plug-in perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from ..data.batching import IGNORE_INDEX, Split
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior
from ..models.likelihood import token_log_probs
from ..models.readout import iter_task_factors
from ..models.tau_prior import TAU_SITE
from .perplexity import PerplexityReport, document_log_likelihoods, report_from_documents


@dataclass(frozen=True)
class PosteriorDraw:
    """One joint draw from the guide: every task's factors and (if learned) tau."""

    factors: dict[str, torch.Tensor]  # name -> [D, *shape]
    tau: torch.Tensor | None  # [groups]


@torch.no_grad()
def posterior_draws(bora: BoRA, num_samples: int, seed: int = 0) -> list[PosteriorDraw]:
    """``num_samples`` joint draws from the fitted guide (seeded); a MAP guide gives its one point repeated."""
    if bora.inference == "map":
        return [PosteriorDraw(bora.task_factors(), None)] * num_samples
    draws = []
    with bora.param_scope():
        pyro.set_rng_seed(seed)
        for _ in range(num_samples):
            guide_trace = poutine.trace(bora.guide).get_trace(None)  # every task
            values = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
            tau = values.get(TAU_SITE)
            draws.append(PosteriorDraw(bora.task_factors(values), None if tau is None else tau.detach().clone()))
    return draws


def tau_averaged_draws(posterior: TauPosterior, num_samples: int, seed: int = 0, device=None) -> list[PosteriorDraw]:
    """``num_samples`` joint draws of every task's factors from the collapsed posterior of tau, tau integrated out
    (:meth:`TauPosterior.draws`), on ``device``: what :func:`posterior_predictive` averages for the tau-averaged
    posterior predictive."""
    return [
        PosteriorDraw({k: v.to(device) for k, v in draw.items()}, None) for draw in posterior.draws(num_samples, seed)
    ]


@dataclass(frozen=True)
class DrawSummary:
    """Per-task summaries of posterior draws (what the ArviZ file keeps of them). Shapes: norm, distance
    [draws, tasks] (||theta_d|| and ||theta_d - Theta||; distance None without a Theta), tau [draws, groups]."""

    norm: np.ndarray
    distance: np.ndarray | None
    tau: np.ndarray | None


@torch.no_grad()
def _norms(factors: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor] | None):
    norm = sum((v**2).flatten(1).sum(1) for v in factors.values()).sqrt()
    distance = None if theta is None else sum(((factors[n] - theta[n]) ** 2).flatten(1).sum(1) for n in theta).sqrt()
    return norm, distance


def summarize_draws(bora: BoRA, draws: list[PosteriorDraw]) -> DrawSummary:
    """Norms and distances to Theta of every task in each draw (and tau)."""
    theta = bora.global_factors()
    parts = [_norms(d.factors, theta) for d in draws]
    return DrawSummary(
        torch.stack([n for n, _ in parts]).cpu().numpy(),
        None if theta is None else torch.stack([d for _, d in parts]).cpu().numpy(),
        None if draws[0].tau is None else torch.stack([d.tau for d in draws]).cpu().numpy(),
    )


def summarize_point(bora: BoRA, num_draws: int) -> DrawSummary:
    """:func:`summarize_draws` for a MAP guide, whose every draw is the point estimate: computed once, in
    chunks of tasks (for any number of tasks)."""
    theta = bora.global_factors()
    parts = [_norms(factors, theta) for _, factors in iter_task_factors(bora)]
    norm = torch.cat([n for n, _ in parts]).cpu().numpy()
    distance = None if theta is None else torch.cat([d for _, d in parts]).cpu().numpy()
    repeat = lambda x: None if x is None else np.repeat(x[None], num_draws, axis=0)
    return DrawSummary(repeat(norm), repeat(distance), None)


def posterior_predictive(
    bora: BoRA, split: Split, draws: list[PosteriorDraw], batch_size: int = 16
) -> tuple[PerplexityReport, torch.Tensor]:
    """Posterior-predictive perplexity and the per-draw document log-likelihoods.

    Shapes: returns (report, doc_loglik [draws, docs]).
    """
    start = time.perf_counter()
    scored: dict[int, torch.Tensor] = {}  # a repeated draw (MAP) is scored once
    for d in draws:
        if id(d) not in scored:
            fn = lambda b, f=d.factors: bora.log_likelihood(f, b)
            scored[id(d)] = document_log_likelihoods(fn, split, bora.device, batch_size)
    per_draw = torch.stack([scored[id(d)] for d in draws])  # [S, docs]
    mixture = torch.logsumexp(per_draw, dim=0) - math.log(len(draws))  # [docs]
    return report_from_documents(split, mixture, time.perf_counter() - start), per_draw


@torch.inference_mode()
def score_plug_in(
    bora: BoRA, split: Split, bins: int = 15, batch_size: int = 16
) -> tuple[PerplexityReport, torch.Tensor, pd.DataFrame, dict[str, float]]:
    """Perplexity and calibration of the point-estimate adapters (with their B-LoRA gates, if any) on
    ``split``, from one pass over its documents (each batch computes its own tasks' factors only).

    Calibration: expected calibration error of the top-1 next-token probability (``bins`` equal-width
    bins) and the Brier score (mean over tokens of sum_v (p_v - 1[v = next])^2).

    Returns: (perplexity report, document log-likelihoods [docs], per-task table with columns task, ece,
    brier, overall {"ece", "brier"} over all tokens).
    """
    start = time.perf_counter()
    num_tasks = len(split.tasks)
    count = torch.zeros(num_tasks, bins, dtype=torch.float64)
    confidence = torch.zeros_like(count)
    correct = torch.zeros_like(count)
    brier = torch.zeros(num_tasks, dtype=torch.float64)
    tokens = torch.zeros(num_tasks, dtype=torch.float64)
    doc_loglik = torch.zeros(len(split), dtype=torch.float64)
    for batch in split.eval_batches(batch_size):
        batch = batch.to(bora.device)
        logits = bora.plug_in_logits(batch)  # [batch, tokens, vocab]
        doc_loglik[batch.doc_index.cpu()] = token_log_probs(logits, batch.labels).sum(-1).double().cpu()
        probs = logits[:, :-1].float().softmax(-1)  # [batch, tokens-1, vocab]
        target = batch.labels[:, 1:]
        scored = target != IGNORE_INDEX
        p, top = probs.max(-1)
        p_true = probs.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        brier_tok = (probs**2).sum(-1) - 2 * p_true + 1  # [batch, tokens-1]
        task = batch.task_index.unsqueeze(1).expand_as(target)[scored].cpu()
        b = (p[scored] * bins).long().clamp_max(bins - 1).cpu()
        flat = task * bins + b
        count.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        confidence.view(-1).index_add_(0, flat, p[scored].double().cpu())
        correct.view(-1).index_add_(0, flat, (top == target)[scored].double().cpu())
        brier.index_add_(0, task, brier_tok[scored].double().cpu())
        tokens.index_add_(0, task, torch.ones_like(task, dtype=torch.float64))
    per_token = tokens.where(tokens > 0, torch.nan)  # a task without scored tokens has no calibration: NaN
    ece = ((confidence - correct).abs().sum(-1) / per_token).numpy()
    per_task = pd.DataFrame({"task": split.tasks, "ece": ece, "brier": (brier / per_token).numpy()})
    total = tokens.sum() if tokens.sum() > 0 else torch.tensor(torch.nan, dtype=torch.float64)
    overall = {
        "ece": float((confidence.sum(0) - correct.sum(0)).abs().sum() / total),
        "brier": float(brier.sum() / total),
    }
    return report_from_documents(split, doc_loglik, time.perf_counter() - start), doc_loglik, per_task, overall
