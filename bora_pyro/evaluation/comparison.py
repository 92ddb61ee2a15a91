"""Comparing runs on the same held-out documents by their expected log predictive density (elpd).

For run r and test document i, elpd_ri = log p(doc_i | training data) (``test_docs.csv``: the log mean over
the guide's draws, the plug-in for a MAP run). Runs are ranked by their total; each run's difference from
the best, sum_i (elpd_ri - elpd_best,i), comes with two paired standard errors: over documents,
sqrt(n var_i(diff_i)), and over tasks, sqrt(D var_d(sum_{i in d} diff_i)) (documents of one task are not
independent draws, so the task one is the honest one when tasks differ). PSIS-LOO is NOT used: it
estimates leave-one-out fit on the training documents, and on held-out documents its estimate subtracts
a penalty that grows with the posterior's spread (with few draws its tail fit also fails).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

IDENTITY = ("doc", "task", "tokens")  # what must agree for two runs to have scored the same documents


def _check_same_documents(tables: Mapping[str, pd.DataFrame]) -> None:
    names = list(tables)
    first = tables[names[0]]
    for name in names[1:]:
        other = tables[name]
        if len(other) != len(first) or not all((other[c].to_numpy() == first[c].to_numpy()).all() for c in IDENTITY):
            raise ValueError(
                f"runs {names[0]!r} and {name!r} were scored on different test documents ({len(first)} and "
                f"{len(other)} documents, or other tasks or tokens): compare runs of one corpus split"
            )


def paired_se(diff: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Standard error of sum(diff) treating documents (or, with ``groups``, the groups' sums) as independent."""
    if groups is not None:
        diff = pd.Series(diff).groupby(groups, sort=False).sum().to_numpy()
    n = len(diff)
    return float(math.sqrt(n * diff.var(ddof=1))) if n > 1 else float("nan")


def compare_runs(
    tables: Mapping[str, pd.DataFrame], mc_se: Mapping[str, float] | None = None, column: str = "elpd"
) -> pd.DataFrame:
    """One row per run, best first: ``elpd`` (total over the documents), ``elpd_diff`` (best minus it, >= 0),
    ``se_docs`` / ``se_tasks`` (paired SEs of the difference over documents / tasks), ``ppl`` (exp(-elpd /
    tokens), the posterior-predictive perplexity), ``mc_se`` (Monte Carlo SE of the run's elpd from its draws,
    if given), ``docs``, ``tasks``. ``tables``: run -> its test_docs.csv; ``column``: the log density to use
    (``elpd``, ``loglik_plug_in`` or ``loglik_tau_averaged``)."""
    if len(tables) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(tables)}")
    _check_same_documents(tables)
    for name, table in tables.items():
        if column not in table:
            raise ValueError(f"run {name!r} has no {column!r} column in its test_docs.csv")
    totals = {name: float(t[column].sum()) for name, t in tables.items()}
    best = max(totals, key=totals.get)
    tokens = float(tables[best].tokens.sum())
    tasks = tables[best].task.to_numpy()
    rows = []
    for name, table in tables.items():
        diff = tables[best][column].to_numpy() - table[column].to_numpy()  # [docs], >= 0 in sum
        rows.append(
            {
                "run": name,
                "elpd": totals[name],
                "elpd_diff": totals[best] - totals[name],
                "se_docs": 0.0 if name == best else paired_se(diff),
                "se_tasks": 0.0 if name == best else paired_se(diff, tasks),
                "ppl": math.exp(-totals[name] / tokens) if tokens > 0 else float("nan"),
                "mc_se": float("nan") if mc_se is None else float(mc_se.get(name, float("nan"))),
                "docs": len(table),
                "tasks": int(pd.Series(tasks).nunique()),
            }
        )
    return pd.DataFrame(rows).sort_values("elpd", ascending=False).set_index("run")
