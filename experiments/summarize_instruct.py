"""Tables of the instruction benchmark (experiments/instruct_bench.sh): overall and per task (by task size).

    python experiments/summarize_instruct.py RUNS_DIR [--out experiments/results/instruct_bench.md]

Reads every RUNS_DIR/<config>-seed<k>/ (metrics.json, per_task.csv, generation_per_task.csv) and
RUNS_DIR/<config>-seed<k>.seconds (wall time of train + evaluate --generate). Means ± sd over the seeds
present; the per-task gain is each task's test perplexity relative to independent adapters (tau = 0) and to
the pooled adapter with a task prompt, against the task's number of training pairs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

LABELS = {
    "tau0": "BoRA τ = 0 (independent adapters)",
    "tau10": "BoRA τ = 10",
    "tau100": "BoRA τ = 100",
    "tauinf": "τ = ∞ (one pooled adapter)",
    "pooled_prompt": "one pooled adapter + task prompt (TRL-style)",
    "whole_text": "BoRA τ = 10, whole-text loss",
}


def runs(folder: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r".+-seed\d+", p.name)):
        config, seed = run.name.rsplit("-seed", 1)
        if not (run / "generation_per_task.csv").is_file():
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        per_task = pd.read_csv(run / "per_task.csv").set_index("task")
        generated = pd.read_csv(run / "generation_per_task.csv").set_index("task")
        seconds = Path(f"{run}.seconds")
        for task in per_task.index:
            rows.append(
                {
                    "config": config,
                    "seed": int(seed),
                    "task": task,
                    "n_train": int(per_task.loc[task, "n_train_docs"]),
                    "test_ppl": per_task.loc[task, "test_ppl"],
                    "base_test_ppl": per_task.loc[task, "base_test_ppl"],
                    "chrf": generated.loc[task, "chrf"],
                    "exact": generated.loc[task, "exact_match"],
                    "run_test_ppl": metrics["test_ppl"],
                    "run_test_macro_ppl": metrics["test_macro_ppl"],
                    "run_base_test_ppl": metrics["base_test_ppl"],
                    "run_chrf": _overall_chrf(run / "generation.csv"),
                    "run_seconds": float(seconds.read_text()) if seconds.is_file() else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def _overall_chrf(answers: Path) -> float:
    """The corpus chrF over all answers of a run (its generation.csv; an empty answer is "", not missing)."""
    import sacrebleu

    frame = pd.read_csv(answers, keep_default_na=False)
    return sacrebleu.corpus_chrf(frame.output.astype(str).tolist(), [frame.reference.astype(str).tolist()]).score


def _mean_sd(values: pd.Series, digits: int) -> str:
    if len(values) == 1 or values.std() != values.std():
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def _plain(table: pd.DataFrame) -> str:
    """A config without a task prompt: its base-model scores are those of the plain prompts."""
    return next(c for c in LABELS if c in set(table.config) and c != "pooled_prompt")


def overall(table: pd.DataFrame) -> str:
    per_run = table.groupby(["config", "seed"]).first().reset_index()
    lines = [
        "| | seeds | test ppl (completions), token-weighted | task-macro | chrF | chrF task-macro | exact match | "
        "wall s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = per_run[per_run.config == _plain(per_run)].run_base_test_ppl.iloc[0]
    lines.append(f"| SmolLM2-135M-Instruct, no adapter | | {base:.2f} | | | | | |")
    for config in [c for c in LABELS if c in set(per_run.config)]:
        runs_ = per_run[per_run.config == config]
        tasks = table[table.config == config].groupby("seed")
        lines.append(
            f"| {LABELS[config]} | {len(runs_)} | {_mean_sd(runs_.run_test_ppl, 2)} | "
            f"{_mean_sd(runs_.run_test_macro_ppl, 2)} | {_mean_sd(runs_.run_chrf, 1)} | "
            f"{_mean_sd(tasks.chrf.mean(), 1)} | {_mean_sd(tasks.exact.mean(), 3)} | {runs_.run_seconds.mean():.0f} |"
        )
    return "\n".join(lines)


def per_task(table: pd.DataFrame, value: str, digits: int, base: str | None = None) -> str:
    """One row per task (largest first), one column per config (means over seeds); ``base``: a first column
    of the base model's value."""
    means = table.groupby(["task", "config"])[value].mean().unstack()
    sizes = table.groupby("task").n_train.first().sort_values(ascending=False)
    configs = [c for c in LABELS if c in means.columns]
    first = table[table.config == _plain(table)].groupby("task")[base].first() if base else None
    lines = [
        "| task (training pairs) | "
        + ("no adapter | " if base else "")
        + " | ".join(LABELS[c] for c in configs)
        + " |",
        "|---|" + "---|" * (len(configs) + bool(base)),
    ]
    for task, n in sizes.items():
        cells = " | ".join(f"{means.loc[task, c]:.{digits}f}" for c in configs)
        lead = f"{first[task]:.{digits}f} | " if base else ""
        lines.append(f"| {task} ({n}) | {lead}{cells} |")
    return "\n".join(lines)


def gains(table: pd.DataFrame) -> str:
    means = table.groupby(["task", "config"]).test_ppl.mean().unstack()
    sizes = table.groupby("task").n_train.first().sort_values(ascending=False)
    best = "tau10" if "tau10" in means.columns else None
    if best is None:
        return ""
    lines = ["| task (training pairs) | vs τ = 0 | vs pooled + task prompt |", "|---|---|---|"]
    for task, n in sizes.items():
        cells = []
        for other in ("tau0", "pooled_prompt"):
            cells.append(
                f"{100 * (1 - means.loc[task, best] / means.loc[task, other]):+.1f}%" if other in means.columns else ""
            )
        lines.append(f"| {task} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_gains(table: pd.DataFrame, out: Path) -> None:
    """Test perplexity of each method relative to independent adapters (τ = 0), per task, against task size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = table.groupby(["task", "config"]).test_ppl.mean().unstack()
    sizes = table.groupby("task").n_train.first()
    if "tau0" not in means.columns:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for config in [c for c in LABELS if c in means.columns and c != "tau0"]:
        gain = (100 * (1 - means[config] / means["tau0"]))[sizes.sort_values().index]
        ax.plot(sizes[gain.index], gain, "o-" if config == "tau10" else "o--", label=LABELS[config])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training pairs of the task")
    ax.set_ylabel("test perplexity gain over τ = 0 (%)")
    ax.set_title("bible-translate, SmolLM2-135M-Instruct")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/instruct_bench.md"))
    a = parser.parse_args()
    table = runs(a.runs)
    if table.empty:
        raise SystemExit(f"no finished runs in {a.runs}")
    text = (
        "## Overall\n\n"
        + overall(table)
        + "\n\n## Test perplexity on the completions, per task\n\n"
        + per_task(table, "test_ppl", 2, "base_test_ppl")
        + "\n\n## chrF of 24 greedy answers per task\n\n"
        + per_task(table, "chrf", 1)
        + "\n\n## Test-perplexity gain of τ = 10, per task (positive: τ = 10 is better)\n\n"
        + gains(table)
        + "\n"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    table.to_csv(a.out.with_suffix(".csv"), index=False)
    plot_gains(table, a.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
