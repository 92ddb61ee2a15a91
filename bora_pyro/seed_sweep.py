"""A tau sweep repeated over training seeds on one data split: mean +- sd, paired differences, error bars.

``DIR/seed=<S>/`` is an ordinary sweep folder (see ``sweep.py``) trained with ``--seed S`` and the split
of ``--split-seed`` (default: the first seed), so that every seed is scored on the same test documents.
``summarize_seeds`` writes ``DIR/tau_seeds.csv`` (per tau: mean and sd over seeds of the validation and
test perplexities and of the wall time), ``DIR/paired.csv`` (the best tau against tau = 0 and tau = inf,
seed by seed), ``DIR/per_task_seeds.csv`` (per task: the best tau's relative gain, mean and sd over seeds),
``figure2.png`` and ``figure3.png`` with error bars, and ``summary.md``. The best tau is the one with the
lowest mean validation perplexity; numbers are reported on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .io.artifacts import read_json, write_json
from .io.folders import MARKER, folder_lock, mark
from .runs import RunSpec
from .sweep import check_sweep_folder, collect, known_base_test_ppl, run_sweep, tau_label

SEEDS_FILE = "seeds.json"


def parse_seeds(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]; duplicates refused."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def run_seed_sweep(spec: RunSpec, taus: Sequence[float], seeds: Sequence[int], out: str | Path) -> pd.DataFrame:
    """One sweep per training seed (each resumable) on ``spec``'s split, then :func:`summarize_seeds`."""
    out = check_sweep_folder(out)
    with folder_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).exists():
            mark(out, "sweep")
        write_json(out / SEEDS_FILE, {"seeds": sorted(set(seeds) | set(_seeds(out))), "split_seed": spec.corpus.seed})
    for seed in seeds:
        print(f"seeds: training seed {seed} -> {out / f'seed={seed}'}", flush=True)
        base = known_base_test_ppl(sorted(out.glob("seed=*")))  # one split and base model for every seed
        run_sweep(replace(spec, train=replace(spec.train, seed=seed)), taus, out / f"seed={seed}", base)
    return summarize_seeds(out)


def _split_seed(out: Path) -> int | str:
    """The split seed every run of ``out`` used (from their configs; "differing" if they did not share one)."""
    seeds = {read_json(p)["corpus"]["seed"] for p in out.glob("seed=*/runs/tau=*/config.json")}
    return seeds.pop() if len(seeds) == 1 else "differing"


def _seeds(out: Path) -> list[int]:
    if (out / SEEDS_FILE).is_file():
        return list(read_json(out / SEEDS_FILE)["seeds"])
    return []


def collect_seeds(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every finished run of every seed: (one row per seed and tau, one row per seed, tau and task)."""
    tables, per_tasks = [], []
    for folder in sorted(out.glob("seed=*")):
        seed = int(folder.name.split("=", 1)[1])
        table, per_task, _ = collect(folder)
        tables.append(table.assign(seed=seed))
        per_tasks.append(per_task.assign(seed=seed))
    if not tables:
        raise ValueError(f"no finished runs under {out}/seed=*/runs")
    return pd.concat(tables, ignore_index=True), pd.concat(per_tasks, ignore_index=True)


def _mean_sd(frame: pd.DataFrame, by: str | list[str], columns: Sequence[str]) -> pd.DataFrame:
    grouped = frame.groupby(by)[list(columns)]
    stats = grouped.agg(["mean", "std"])
    stats.columns = [f"{c}_{s.replace('std', 'sd')}" for c, s in stats.columns]
    return stats.assign(seeds=grouped.size()).reset_index()


def paired_differences(table: pd.DataFrame, best: float) -> pd.DataFrame:
    """Seed by seed, the best tau's test perplexity minus that of tau = 0 and of tau = inf (negative:
    the best tau is better); only seeds that ran both. Columns: reference, seed, metric, difference, relative."""
    rows = []
    wide = {
        metric: table.pivot(index="seed", columns="tau", values=metric) for metric in ("test_ppl", "test_macro_ppl")
    }
    for reference in (0.0, math.inf):
        for metric, by_tau in wide.items():
            if reference not in by_tau or best not in by_tau or reference == best:
                continue
            both = by_tau[[best, reference]].dropna()
            for seed, (ours, theirs) in both.iterrows():
                rows.append(
                    {
                        "reference": tau_label(reference),
                        "seed": seed,
                        "metric": metric,
                        "difference": ours - theirs,
                        "relative": (ours - theirs) / theirs,
                    }
                )
    return pd.DataFrame(rows, columns=["reference", "seed", "metric", "difference", "relative"])


def per_task_gains(per_task: pd.DataFrame, best: float) -> pd.DataFrame:
    """Per task and seed, the best tau's relative gain over tau = 0 and tau = inf; mean and sd over seeds."""
    wide = per_task.pivot_table(index=["task", "seed"], columns="tau", values="test_ppl")
    gains = pd.DataFrame(index=wide.index)
    for name, reference in (("gain_over_0", 0.0), ("gain_over_inf", math.inf)):
        if reference in wide and best in wide and reference != best:
            gains[name] = (wide[reference] - wide[best]) / wide[reference]
    sizes = per_task.drop_duplicates("task").set_index("task")["n_train_tokens"]
    stats = _mean_sd(gains.reset_index(), "task", [c for c in gains.columns])
    return stats.assign(n_train_tokens=stats.task.map(sizes)).sort_values("n_train_tokens", ascending=False)


def _markdown(frame: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)])


def summarize_seeds(out: str | Path) -> pd.DataFrame:
    """Write the multi-seed tables, figures and summary.md; returns the per-tau table."""
    out = Path(out)
    table, per_task = collect_seeds(out)
    stats = _mean_sd(table, "tau", ["valid_ppl", "test_ppl", "test_macro_ppl", "wall_seconds", "train_seconds"])
    best = float(stats.loc[stats.valid_ppl_mean.idxmin(), "tau"])
    paired = paired_differences(table, best)
    gains = per_task_gains(per_task, best)
    stats.to_csv(out / "tau_seeds.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    gains.to_csv(out / "per_task_seeds.csv", index=False)
    from .evaluation.plots import plot_seed_figures  # matplotlib: imported when figures are drawn

    plot_seed_figures(out, stats, per_task, gains, best)
    shown = pd.DataFrame(
        {
            "tau": stats.tau.map(tau_label),
            "seeds": stats.seeds,
            "valid ppl": [f"{m:.1f} ± {s:.1f}" for m, s in zip(stats.valid_ppl_mean, stats.valid_ppl_sd)],
            "test ppl": [f"{m:.1f} ± {s:.1f}" for m, s in zip(stats.test_ppl_mean, stats.test_ppl_sd)],
            "test ppl, task-macro": [
                f"{m:.1f} ± {s:.1f}" for m, s in zip(stats.test_macro_ppl_mean, stats.test_macro_ppl_sd)
            ],
            "wall time per run (s)": [
                f"{m:.0f} ± {s:.0f}" for m, s in zip(stats.wall_seconds_mean, stats.wall_seconds_sd)
            ],
        }
    )
    lines = [
        "# tau sweep over training seeds",
        "",
        f"Seeds: {sorted(table.seed.unique().tolist())}; one data split (split seed {_split_seed(out)}). "
        f"Best tau on mean validation perplexity: **{tau_label(best)}**. Mean ± sd over seeds.",
        "",
        _markdown(shown),
        "",
        "## The best tau against the extremes, seed by seed (test perplexity)",
        "",
    ]
    for (reference, metric), rows in paired.groupby(["reference", "metric"], sort=False):
        diff, rel = rows.difference, 100 * rows.relative
        verdict = (
            "beats it in every seed, by more than twice the seed-to-seed sd of the difference"
            if (diff < 0).all() and -diff.mean() > 2 * diff.std(ddof=1)
            else "beats it in every seed"
            if (diff < 0).all()
            else "does not beat it in every seed"
        )
        lines.append(
            f"* vs tau={reference}, {metric}: difference {diff.mean():+.2f} ± {diff.std(ddof=1):.2f} "
            f"({rel.mean():+.1f}% ± {rel.std(ddof=1):.1f}%) over {len(rows)} seeds: tau={tau_label(best)} {verdict}"
        )
    lines += ["", "## Per task: relative gain of the best tau (mean ± sd over seeds)", "", _markdown(gains.round(4))]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return stats
