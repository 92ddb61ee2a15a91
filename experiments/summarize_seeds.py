"""Summarise the runs of experiments/seeds.sh into experiments/results/ (tables, figures, light run files).

.venv/bin/python experiments/summarize_seeds.py --runs runs --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from bora_pyro.runs.run_files import COMPLETE, status_of
from bora_pyro.seed_sweep import summarize_seeds

LIGHT = ("config.json", "metrics.json", "per_task.csv", "train_log.csv", "status.json")


def copy_light(source: Path, target: Path) -> None:
    """The tables and figures of a results folder, and each run's small files (no adapters, no ArviZ file)."""
    for path in source.rglob("*"):
        keep = path.is_file() and (
            path.parent == source and path.suffix in (".csv", ".md", ".png", ".json") or path.name in LIGHT
        )
        if keep:
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(source))


def complete(folder: Path) -> bool:
    """The run is scored (a run marked trained already has a metrics.json, without the test scores)."""
    return status_of(folder) == COMPLETE


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


LEARNED = {
    "seeds_books10": ("learned10", "learned_tau_seeds", "ten books"),
    "seeds_books71": ("learned71", "learned_tau_seeds_books71", "all 71 books"),
}


def tau_cell(m: dict) -> str:
    """A run's tau: "13.7 [13.6, 13.7]" (learned, one tau), "q_proj 12 [11, 13]; v_proj ..." (learned per module),
    "10 (fixed)"."""
    quantiles = m.get("tau_posterior_q05_q50_q95")
    if quantiles is None:
        return f"{float(m['tau']):g} (fixed)"
    cells = {group: f"{q50:.3g} [{q05:.3g}, {q95:.3g}]" for group, (q05, q50, q95) in quantiles.items()}
    return cells["all"] if list(cells) == ["all"] else "; ".join(f"{g} {c}" for g, c in cells.items())


def learned_table(runs: Path, learned: str, grid_name: str, grid: pd.DataFrame) -> str:
    """VI runs (each variant: guide lr, tau groups, a fixed tau) against the grid's best tau (MAP), seed by seed."""
    best = float(grid.loc[grid.valid_ppl_mean.idxmin(), "tau"])
    lines = [
        "| variant | seed | tau (learned: median [5%, 95%]) | test ppl | task-macro | wall (s) | best grid tau "
        f"({best:g}) test ppl, same seed | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gaps: dict[str, list[float]] = {}
    for folder in sorted(runs.glob(f"{learned}/*/seed=*")):
        if not complete(folder):
            continue
        m, seed = metrics(folder), int(folder.name.split("=")[1])
        grid_run = runs / grid_name / f"seed={seed}" / "runs" / f"tau={best:g}" / "metrics.json"
        ref = json.loads(grid_run.read_text())["test_ppl"] if grid_run.is_file() else float("nan")
        gap = 100 * (m["test_ppl"] / ref - 1)
        gaps.setdefault(folder.parent.name, []).append(gap)
        lines.append(
            f"| {folder.parent.name} | {seed} | {tau_cell(m)} | "
            f"{m['test_ppl']:.1f} | {m['test_macro_ppl']:.1f} | {m['wall_seconds']:.0f} | {ref:.1f} | {gap:+.1f}% |"
        )
    lines.append("")
    for variant, values in gaps.items():
        gap = pd.Series(values)
        spread = f" ± {gap.std():.2f}% (mean ± sd over {len(gap)} seeds)" if len(gap) > 1 else " (one seed)"
        lines.append(f"* {variant}: gap {gap.mean():+.2f}%{spread}")
    return "\n".join(lines)


def chapters_table(runs: Path) -> str:
    lines = [
        "| tau | tasks | test ppl | task-macro | base test ppl | train steps | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in sorted(runs.glob("chapters/tau=*")):
        if complete(folder):
            m = metrics(folder)
            lines.append(
                f"| {folder.name.split('=')[1]} | {m['num_tasks']} | {m['test_ppl']:.1f} | "
                f"{m['test_macro_ppl']:.1f} | {m['base_test_ppl']:.1f} | {m['steps']} | {m['wall_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    runs, out = Path(args.runs), Path(args.out)
    sections = []
    for name, (learned, results, label) in LEARNED.items():
        if not ((runs / name).is_dir() and list((runs / name).glob("seed=*/runs/tau=*/metrics.json"))):
            continue
        grid = summarize_seeds(runs / name)
        copy_light(runs / name, out / name)
        if any(complete(folder) for folder in runs.glob(f"{learned}/*/seed=*")):
            sections.append(f"## {label.capitalize()}\n\n" + learned_table(runs, learned, name, grid))
            copy_light(runs / learned, out / results)
    if sections:
        (out / "learned_tau_seeds.md").write_text(
            "# Learned tau (VI) against the grid (MAP)\n\n" + "\n\n".join(sections) + "\n"
        )
    if any(complete(folder) for folder in runs.glob("chapters/tau=*")):
        (out / "chapters.md").write_text(
            "# 1,304 chapters of the Wycliffe Bible as tasks\n\n" + chapters_table(runs) + "\n"
        )
        copy_light(runs / "chapters", out / "chapters")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="experiments/results")
    main(parser.parse_args())
