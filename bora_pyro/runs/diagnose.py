"""``bora-pyro diagnose``: what a run folder says about its fit, and an honest comparison of several runs.

Per run: the collapsed posterior of tau (``tau_posterior.csv``), the shrinkage of every task (kappa, p_eff in
``per_task.csv``), the check of the Gaussian prior (``prior_check.csv``), the guide's scales (VI), and, where
the run has ``posterior.nc`` (``--posterior-samples N``), the ArviZ summary and plots. Several runs are
compared on their common test documents by elpd with paired standard errors (``evaluation/comparison.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..evaluation.collapsed import tau_posterior_line
from ..evaluation.comparison import compare_runs
from ..io.integrity import CorruptFile
from ..models.collapsed_tau import TauPosterior
from ..models.tau_prior import TauPrior
from .run_files import PER_TASK_FILE, PRIOR_CHECK_FILE, TAU_POSTERIOR_FILE, TEST_DOCS_FILE, read_metrics

SHRINKAGE_COLUMNS = ("task", "n_train_tokens", "kappa", "p_eff", "scale_ratio", "test_ppl", "tau_averaged_test_ppl")
COMPARE_BY = {"elpd": "elpd", "plug-in": "loglik_plug_in", "tau-averaged": "loglik_tau_averaged"}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise CorruptFile(f"{path} cannot be read as a table ({type(err).__name__}: {err})") from None


def run_lines(folder: Path, tau_prior: str | None = None) -> list[str]:
    """What ``diagnose`` prints of one run folder (its files verified by the caller); ``tau_prior``: also the
    tau posterior under this hyperprior (the grid reweighted: how much the answer depends on the prior)."""
    metrics = read_metrics(folder)
    lines = [f"tau: fitted at {metrics.get('tau')}"]
    line = tau_posterior_line(metrics)
    skipped = metrics.get("tau_posterior_skipped") or "trained with --curvature-docs 0, or by an older bora_pyro"
    lines.append(line or f"no collapsed tau posterior: {skipped}")
    if line and tau_prior is not None:
        frame = _read_csv(folder / TAU_POSTERIOR_FILE)
        other = TauPosterior.from_frame(frame, TauPrior.parse(tau_prior)).summary()
        text = "; ".join(f"{g} {s['median']:.3g} [{s['q05']:.3g}, {s['q95']:.3g}]" for g, s in other.items())
        lines.append(f"under the hyperprior {tau_prior} instead: {text}")
    if (folder / PER_TASK_FILE).is_file():
        per_task = _read_csv(folder / PER_TASK_FILE)
        if "kappa" in per_task and per_task.kappa.notna().any():
            columns = [c for c in SHRINKAGE_COLUMNS if c in per_task]
            table = per_task[columns].sort_values("n_train_tokens", ascending=False)
            lines.append("shrinkage at the fitted tau (kappa: share of the adapter from Theta; p_eff: own parameters):")
            lines.append(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if (folder / PRIOR_CHECK_FILE).is_file():
        check = _read_csv(folder / PRIOR_CHECK_FILE)
        if not check.empty:
            worst = check.loc[check.mean_square.idxmax()]
            lines.append(
                f"prior check (standardised residuals (mu - Thetabar) sqrt(w) over {int(check.n.sum()):,} coordinates, "
                f"about N(0, 1) if the Gaussian prior fits): mean square {_weighted(check, 'mean_square'):.3g} (1), "
                f"share beyond 3 {_weighted(check, 'share_beyond_3'):.2%} (0.27%), excess kurtosis "
                f"{_weighted(check, 'excess_kurtosis'):.3g} (0); worst factor {worst.factor} ({worst.mean_square:.3g})"
            )
    if metrics.get("guide_scale_warning"):
        lines.append(metrics["guide_scale_warning"])
    return lines


def _weighted(frame: pd.DataFrame, column: str) -> float:
    return float((frame[column] * frame.n).sum() / frame.n.sum())


def compare_folders(folders: Sequence[tuple[str, Path]], by: str = "elpd") -> pd.DataFrame:
    """:func:`compare_runs` of run folders (name, folder) by ``by`` (a key of :data:`COMPARE_BY`)."""
    if by not in COMPARE_BY:
        raise ValueError(f"compare by one of {tuple(COMPARE_BY)}, got {by!r}")
    tables, mc_se = {}, {}
    for name, folder in folders:
        file = folder / TEST_DOCS_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: the run was trained by an older bora_pyro (before test_docs.csv); train it "
                "again to compare it"
            )
        tables[name] = _read_csv(file)
        value = read_metrics(folder).get("test_elpd_mc_se")
        mc_se[name] = float("nan") if value is None else float(value)
    return compare_runs(tables, mc_se, COMPARE_BY[by])
