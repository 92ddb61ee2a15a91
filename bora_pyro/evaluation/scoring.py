"""Scoring a fitted run: test and validation perplexity, the base model's, posterior-predictive
perplexity, calibration and the B-LoRA gate report. Computes; writes nothing (see ``runs/run_files.py``).

Every data-parallel rank must call :func:`score_run` (evaluation sums the ranks' shares).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..data.batching import IGNORE_INDEX
from ..data.corpus import Corpus
from ..models.bora import BoRA
from ..models.gates import relative_bops
from ..models.readout import distance_to_global
from .collapsed import CollapsedReport, collapsed_report, why_not_collapsed
from .messages import one_per_task_batches
from .perplexity import PerplexityReport, evaluate
from .predictive import posterior_draws, posterior_predictive, score_plug_in, summarize_draws, summarize_point

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """What scoring found: metrics (merged into metrics.json), the per-task table, ArviZ data, gates."""

    metrics: dict[str, Any]
    per_task: pd.DataFrame
    idata: Any | None  # arviz.InferenceData for posterior.nc (None with posterior_samples = 0)
    gates: pd.DataFrame | None
    test_docs: pd.DataFrame  # one row per test document: its task, tokens and log predictive densities
    collapsed: CollapsedReport | None = None  # the tau posterior, shrinkage and prior check (None: skipped)


def _per_task_frame(
    corpus: Corpus,
    reports: dict[str, PerplexityReport],
    distance,
    calib: pd.DataFrame,
    collapsed: CollapsedReport | None,
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "task": corpus.tasks,
            "n_train_docs": corpus.train.docs_per_task(),
            "n_train_tokens": corpus.train.tokens_per_task(),
            "n_test_docs": corpus.test.docs_per_task(),
            "n_test_tokens": corpus.test.tokens_per_task(),
            "test_ppl": reports["test"].per_task,
            "valid_ppl": reports["valid"].per_task,
            "base_test_ppl": reports["base_test"].per_task,
            "distance_to_global": distance.cpu().numpy() if distance is not None else float("nan"),
            "test_ece": calib.ece.to_numpy(),
            "test_brier": calib.brier.to_numpy(),
        }
    )
    if "posterior_predictive_test" in reports:
        frame["posterior_predictive_test_ppl"] = reports["posterior_predictive_test"].per_task
    nan = float("nan")
    frame["kappa"] = nan if collapsed is None else collapsed.shrinkage.kappa.to_numpy()
    frame["p_eff"] = nan if collapsed is None else collapsed.shrinkage.p_eff.to_numpy()
    frame["tau_averaged_test_ppl"] = nan if collapsed is None else collapsed.tau_averaged.per_task
    if collapsed is not None and collapsed.scales is not None:
        frame["scale_ratio"] = collapsed.scales.scale_ratio.to_numpy()
        frame["scale_unconverged"] = collapsed.scales.scale_unconverged.to_numpy()
    return frame


def test_documents(
    corpus: Corpus, plug_in: torch.Tensor, draws: torch.Tensor | None, collapsed: CollapsedReport | None
) -> pd.DataFrame:
    """Per test document: task, scored tokens, the plug-in log-likelihood, the log predictive density
    ``elpd`` (log mean over the guide's draws; the plug-in for a MAP run or without draws) and, with a
    collapsed report, the tau-averaged mean adapter's. Shapes: plug_in [docs], draws [draws, docs]."""
    split = corpus.test
    elpd = plug_in if draws is None else torch.logsumexp(draws.double(), 0) - math.log(draws.shape[0])
    frame = pd.DataFrame(
        {
            "doc": range(len(split)),
            "task": [split.tasks[t] for t in split.task_index],
            "tokens": [sum(1 for t in labels if t != IGNORE_INDEX) for labels in split.labels],
            "loglik_plug_in": plug_in.double().numpy(),
            "elpd": elpd.double().numpy(),
        }
    )
    if collapsed is not None:
        frame["loglik_tau_averaged"] = collapsed.tau_averaged_loglik.double().numpy()
    return frame


def gate_metrics(report: pd.DataFrame) -> dict:
    """Summary of a gate report: mean effective rank, rank by module type, bit-widths, relative BOPs."""
    return {
        "gates_mean_rank": float(report["rank"].mean()),
        "gates_rank_by_module": report.groupby("module")["rank"].mean().to_dict(),
        "gates_weight_bits": report["weight_bits"].value_counts().sort_index().to_dict(),
        "gates_activation_bits": report["activation_bits"].value_counts().sort_index().to_dict(),
        "relative_bops": relative_bops(report),
    }


def _posterior_scores(
    bora: BoRA,
    corpus: Corpus,
    posterior_samples: int,
    seed: int,
    batch_size: int,
    curvature_docs: int,
    plug_in_loglik: torch.Tensor,
    reports: dict[str, PerplexityReport],
    losses: pd.DataFrame | None,
):
    """The posterior draws' part of :func:`score_run`: the posterior-predictive test report (added to
    ``reports``) and the ArviZ data. Returns (idata, the draws' test log-likelihoods [draws, docs] or None for
    a MAP run, whose every draw is the plug-in point ``plug_in_loglik`` [docs])."""
    from .diagnostics import to_inference_data  # ArviZ: imported only when a run is scored

    train = None
    if bora.inference == "map":  # every draw is the plug-in point
        reports["posterior_predictive_test"] = reports["test"]
        doc_loglik, draws_loglik = plug_in_loglik.expand(posterior_samples, -1), None
        summary = summarize_point(bora, posterior_samples)
    else:
        draws = posterior_draws(bora, posterior_samples, seed=seed)
        reports["posterior_predictive_test"], doc_loglik = posterior_predictive(bora, corpus.test, draws, batch_size)
        draws_loglik = doc_loglik
        summary = summarize_draws(bora, draws)
        if curvature_docs > 0 and len(corpus.train):  # training documents under the same draws: for PSIS-LOO
            batches = one_per_task_batches(corpus.train, curvature_docs, batch_size, seed)
            subset = corpus.train.subset(sorted(i for b in batches for i in b))
            train = (subset, posterior_predictive(bora, subset, draws, batch_size)[1])
    tokens = corpus.train.tokens_per_task()
    return to_inference_data(bora, summary, doc_loglik, corpus.test, tokens, losses, train), draws_loglik


def score_run(
    bora: BoRA,
    corpus: Corpus,
    batch_size: int,
    posterior_samples: int,
    seed: int,
    losses: pd.DataFrame | None = None,
    valid: PerplexityReport | None = None,
    base_test: PerplexityReport | None = None,
    curvature_docs: int = 0,
) -> Scores:
    """Score the fitted ``bora`` on ``corpus`` (``losses``: the training log, kept in the ArviZ file;
    ``valid``: the fit's validation report of the state it kept, and ``base_test``: the base model's test
    report from an earlier run on the same split, each reused instead of scored again).

    The test split is scored once for the plug-in perplexity and the calibration; with a MAP guide every
    posterior draw is that point, so it is also the posterior-predictive perplexity. ``curvature_docs`` > 0:
    the collapsed report (tau posterior, shrinkage, prior check, tau-averaged test perplexity) from a curvature
    pass over that many training documents of each task."""
    if base_test is None:
        base_test = evaluate(bora, corpus.test, batch_size, base_model=True)
    if valid is None:
        valid = evaluate(bora, corpus.valid, batch_size)
    reports = {"base_test": base_test, "valid": valid}
    reports["test"], plug_in_loglik, calib_per_task, calib = score_plug_in(bora, corpus.test, batch_size=batch_size)
    idata, draws_loglik = None, None
    if posterior_samples > 0:
        idata, draws_loglik = _posterior_scores(
            bora, corpus, posterior_samples, seed, batch_size, curvature_docs, plug_in_loglik, reports, losses
        )
    gates = None if bora.gates is None else bora.gates.report(bora.gate_values())
    skipped = why_not_collapsed(bora, corpus, curvature_docs)
    if skipped:
        log.info("no tau posterior or shrinkage: %s", skipped)
    collapsed = None if skipped else collapsed_report(bora, corpus, curvature_docs, seed, batch_size)
    test_docs = test_documents(corpus, plug_in_loglik, draws_loglik, collapsed)
    metrics = {
        "test_ppl": reports["test"].token_weighted,
        "test_macro_ppl": reports["test"].task_macro,
        "valid_ppl": reports["valid"].token_weighted,
        "valid_macro_ppl": reports["valid"].task_macro,
        "base_test_ppl": base_test.token_weighted,
        "base_test_macro_ppl": base_test.task_macro,
        **(
            {
                "posterior_predictive_test_ppl": reports["posterior_predictive_test"].token_weighted,
                "posterior_predictive_test_macro_ppl": reports["posterior_predictive_test"].task_macro,
            }
            if "posterior_predictive_test" in reports
            else {}
        ),
        "eval_tokens_per_second": reports["test"].tokens_per_second,
        "tau_guide_q05_q50_q95": bora.tau_quantiles(),
        "test_elpd": float(test_docs.elpd.sum()),
        "test_elpd_mc_se": elpd_mc_se(draws_loglik),
        "curvature_docs": curvature_docs,
        **({"tau_posterior_skipped": skipped} if collapsed is None else collapsed.metrics()),
        "test_ece": calib["ece"],
        "test_brier": calib["brier"],
        "posterior_samples": posterior_samples,
        "documents": corpus.documents(),
        "test_scored_tasks": int(reports["test"].scored.sum()),
        "data_format": corpus.input_format.describe(),
        **({} if gates is None else gate_metrics(gates)),
    }
    per_task = _per_task_frame(corpus, reports, distance_to_global(bora), calib_per_task, collapsed)
    return Scores(metrics, per_task, idata, gates, test_docs, collapsed)


def elpd_mc_se(draws: torch.Tensor | None, replicates: int = 200, seed: int = 0) -> float:
    """Monte Carlo standard error of the total elpd sum_i log mean_s p(doc_i | theta_s) from S draws: the sd
    of the total over bootstrap resamples of the draws (0 without draws, or for a MAP run's one point).
    Shapes: draws [draws, docs]."""
    if draws is None or draws.shape[0] < 2:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    s = draws.shape[0]
    picks = torch.randint(0, s, (replicates, s), generator=generator)
    totals = torch.stack([(torch.logsumexp(draws[p].double(), 0) - math.log(s)).sum() for p in picks])
    return float(totals.std())


def scored_tasks_line(metrics: dict) -> str | None:
    """One line naming how many tasks have a test score, when some have no test documents (else None)."""
    scored, tasks = metrics.get("test_scored_tasks"), metrics.get("num_tasks")
    if scored is None or tasks is None or scored == tasks:
        return None
    return (
        f"{scored} of {tasks} tasks have test documents and a test score; the other {tasks - scored} are trained "
        "but unscored (test_ppl empty in per_task.csv; see --holdout-min-docs or the data's split)"
    )


def documents_line(documents: dict[str, dict[str, int]], split: str = "test") -> str:
    """One line saying how many of a split's documents were scored (caps are a CPU convenience)."""
    d = documents[split]
    if d["used"] == 0:
        return (
            f"{split}: no held-out documents (every task is too small to hold one out, or the data's split gives none)"
        )
    cut = d.get("capped", 0)
    short = f", {cut} of them only in part (their first chunks)" if cut else ""
    if (d["available"] is None or d["used"] == d["available"]) and not cut:
        return f"{split}: every one of its {d['used']} held-out documents was scored"
    if d["available"] is None or d["used"] == d["available"]:
        return f"{split}: its {d['used']} held-out documents were scored{short} (--max-eval-docs caps chunks per task)"
    return (
        f"{split}: {d['used']} of its {d['available']} held-out documents were scored{short} (capped per task by "
        "--max-eval-docs; --max-eval-docs none scores them all)"
    )
