"""What a run reports from its collapsed tau posterior (``evaluation/tau_posterior.py``): the posterior of tau,
the shrinkage of every task at the run's tau, a check of the Gaussian prior, and the test perplexity of the
tau-averaged posterior mean adapters. Computes; writes nothing (see ``runs/run_files.py``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..data.corpus import Corpus
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior
from ..models.prior import POOLED
from .guide_scales import scale_report, scale_warning
from .messages import custom_likelihood, factor_taus
from .perplexity import PerplexityReport, document_log_likelihoods, report_from_documents
from .tau_posterior import WHY_NOT_POOLED, tau_posterior

MAX_MESSAGE_COORDINATES = 50_000_000  # tasks x coordinates of the messages (~1.4 GB of working tensors)
UNSTATIONARY = 3.0  # fit_stationarity above this: the fit is too far from converged for its messages


@dataclass(frozen=True)
class CollapsedReport:
    """``shrinkage``: per task kappa and p_eff at the run's tau; ``prior_check``: standardised residuals per
    factor at the posterior median; ``tau_averaged``: test report of E[theta_d | data] and its document
    log-likelihoods [docs]; ``seconds``: the time it took."""

    posterior: TauPosterior
    shrinkage: pd.DataFrame
    prior_check: pd.DataFrame
    tau_averaged: PerplexityReport
    tau_averaged_loglik: torch.Tensor
    seconds: float
    scales: pd.DataFrame | None = None  # a VI run's guide scales against their targets, per task
    scale_histogram: np.ndarray | None = None  # [tasks, sample] log10 of those ratios

    def metrics(self) -> dict:
        """tau_q05 / tau_median / tau_q95 (numbers for one tau, {group: number} for several), the messages'
        source and the tau-averaged test perplexity."""
        summary = self.posterior.summary()
        pick = lambda key: summary["all"][key] if list(summary) == ["all"] else {g: s[key] for g, s in summary.items()}
        return {
            "tau_q05": pick("q05"),
            "tau_median": pick("median"),
            "tau_q95": pick("q95"),
            "tau_posterior_source": self.posterior.source,
            "tau_posterior_at_edge": any(self.posterior.at_edge()),
            "fit_stationarity": self.posterior.messages.stationarity,
            "tau_averaged_test_ppl": self.tau_averaged.token_weighted,
            "tau_averaged_test_macro_ppl": self.tau_averaged.task_macro,
            "collapsed_seconds": self.seconds,
            **({} if self.scales is None else {"guide_scale_warning": scale_warning(self.scales)}),
        }


def why_not_collapsed(bora: BoRA, corpus: Corpus, docs_per_task: int) -> str | None:
    """Why a run gets no collapsed report (None: it gets one)."""
    if docs_per_task == 0:
        return "--curvature-docs 0"
    if len(corpus.train) == 0:
        return "no training documents"
    if bora.mode == POOLED:
        return f"a pooled fit (tau = inf): {WHY_NOT_POOLED}"
    if custom_likelihood(bora):
        return "a custom log_likelihood (bora_pyro.tau_posterior takes its sampled_log_likelihood)"
    if bora.task_store.disk:
        return "the task rows are in a disk task store (many tasks): the messages would not fit in memory"
    size = len(bora.tasks) * bora.lora.num_parameters()
    if size > MAX_MESSAGE_COORDINATES:
        return f"{len(bora.tasks)} tasks x {bora.lora.num_parameters()} coordinates exceed {MAX_MESSAGE_COORDINATES:,}"
    return None


def collapsed_report(
    bora: BoRA, corpus: Corpus, docs_per_task: int, seed: int, batch_size: int, progress: bool = False
) -> CollapsedReport:
    """The collapsed report of a fitted run (one curvature pass over at most ``docs_per_task`` training
    documents of each task, one test pass), for a run :func:`why_not_collapsed` gives no reason against."""
    start = time.perf_counter()
    posterior = tau_posterior(
        bora, corpus, docs_per_task=docs_per_task, seed=seed, batch_size=batch_size, progress=progress
    )
    shrink = posterior.shrinkage(factor_taus(bora))
    factors = {k: v.to(bora.device) for k, v in posterior.mean_factors().items()}
    averaged = document_log_likelihoods(lambda b: bora.log_likelihood(factors, b), corpus.test, bora.device, batch_size)
    scales, histogram = None, None
    if bora.inference == "vi" and bora.mode == "hierarchical":
        scales, histogram = scale_report(bora, posterior.every_coordinate())
    seconds = time.perf_counter() - start
    report = report_from_documents(corpus.test, averaged, seconds)
    return CollapsedReport(posterior, shrink, posterior.residuals(), report, averaged, seconds, scales, histogram)


def tau_posterior_line(metrics: dict) -> str | None:
    """One line on the collapsed posterior of tau a run reports (None if it has none)."""
    if "tau_median" not in metrics:
        return None
    low, mid, high = (metrics[k] for k in ("tau_q05", "tau_median", "tau_q95"))
    if isinstance(mid, dict):
        text = "; ".join(f"{g} {mid[g]:.3g} [{low[g]:.3g}, {high[g]:.3g}]" for g in mid)
    else:
        text = f"{mid:.3g}, 90% interval [{low:.3g}, {high:.3g}]"
    if metrics.get("tau_posterior_at_edge"):
        text += " (its mass reaches the end of the range searched, 1e-4 to 1e9: tau -> 0 or tau -> inf)"
    line = (
        f"tau posterior (collapsed, diagonal Gaussian messages from {metrics.get('curvature_docs')} training documents "
        f"per task; exploratory: it has not passed calibration checks on language models, see docs/results.md): {text}"
    )
    stationarity = metrics.get("fit_stationarity")
    if stationarity is not None and stationarity > UNSTATIONARY:
        line += (
            f"; NOT RELIABLE here: the fit has not converged (its measured likelihood gradient departs from the one "
            f"its prior balances by {stationarity:.3g} noise variances, about 1 at convergence), and the Gaussian "
            "messages assume it has: train to convergence (--steps, --patience) before reading tau from it"
        )
    if metrics.get("tau_averaged_test_ppl") is not None:
        line += f"; tau-averaged adapters: test perplexity {metrics['tau_averaged_test_ppl']:.2f}"
    return line
