"""Summarise experiments/convergence_bench.sh: the claim at convergence against the practitioner's baseline.

For every finished run (config x seed) under RUNS: test perplexity, task-macro, the step of the best validation,
steps run, wall time; from the saved adapters (messages at them by one curvature pass, refreshed once): the
collapsed posterior of tau and the test perplexity of the tau-averaged adapters; per test document the
log-likelihood of each run's adapters, for paired differences (standard errors over documents and over books)
against the grid's best configuration.

    .venv/bin/python experiments/summarize_convergence.py runs/convergence --out experiments/results/convergence_bench

Writes convergence_bench.csv, convergence_per_book.csv, convergence_bench.md and convergence_bench.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

import bora_pyro
from bora_pyro.evaluation.comparison import compare_runs
from bora_pyro.evaluation.perplexity import document_log_likelihoods, report_from_documents

CONFIG_NAMES = {
    "tau0": "τ = 0 (independent)",
    "tau10": "τ = 10",
    "tau100": "τ = 100",
    "tauinf": "τ = ∞ (pooled)",
    "pooled_prompt": "pooled + task prompt",
    "tau10_prompt": "τ = 10 + task prompt",
    "learn": "τ learned (VI)",
}


def document_table(run: bora_pyro.runs.load.LoadedRun, factors: dict) -> pd.DataFrame:
    """Per test document: task, tokens and its log-likelihood under ``factors`` (name -> [D, ...])."""
    split = run.corpus.test
    bora = run.bora
    loglik = document_log_likelihoods(lambda b: bora.log_likelihood(factors, b), split, bora.device)
    return pd.DataFrame(
        {
            "doc": range(len(split)),
            "task": [split.tasks[t] for t in split.task_index],
            "tokens": [sum(1 for t in labels if t >= 0) for labels in split.labels],
            "elpd": loglik.numpy(),
        }
    )


def summarize_run(folder: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    config, _, seed = folder.name.rpartition("-seed")
    metrics = json.loads((folder / "metrics.json").read_text())
    run = bora_pyro.load_run(folder)
    plug_in = document_table(run, run.task_factors)
    row = {
        "config": config,
        "seed": int(seed),
        "test_ppl": metrics["test_ppl"],
        "test_macro_ppl": metrics["test_macro_ppl"],
        "best_step": metrics["best_step"],
        "steps": metrics["steps"],
        "stopped_early": metrics["stopped_early"],
        "wall_seconds": metrics["wall_seconds"],
    }
    averaged = None
    if run.bora.mode != "pooled":  # a pooled fit has no task's mode to expand at (bora_pyro.tau_posterior refuses)
        posterior = run.tau_posterior(refresh=True)
        low, mid, high = posterior.quantiles((0.05, 0.5, 0.95))[0]
        factors = {k: v.to(run.bora.device) for k, v in posterior.mean_factors().items()}
        averaged = document_table(run, factors)
        report = report_from_documents(run.corpus.test, torch.as_tensor(averaged.elpd.to_numpy()), 0.0)
        row.update({"tau_q05": low, "tau_median": mid, "tau_q95": high, "tau_averaged_test_ppl": report.token_weighted})
    per_book = pd.read_csv(folder / "per_task.csv")[["task", "n_train_tokens", "test_ppl"]].assign(
        config=config, seed=int(seed)
    )
    return row, plug_in, averaged, per_book


def main(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, docs, books = [], {}, []
    for folder in sorted(runs.glob("*-seed*")):
        status = folder / "status.json"
        if not status.is_file() or '"complete"' not in status.read_text():
            print(f"skipped (not complete): {folder}")
            continue
        row, plug_in, averaged, per_book = summarize_run(folder)
        rows.append(row)
        docs[(row["config"], row["seed"])] = plug_in
        if averaged is not None:
            docs[(f"{row['config']} τ-averaged", row["seed"])] = averaged
        books.append(per_book)
        print(f"{folder.name}: test ppl {row['test_ppl']:.2f}, best step {row['best_step']}", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "convergence_bench.csv", index=False)
    per_book = pd.concat(books)
    per_book.to_csv(out / "convergence_per_book.csv", index=False)
    seeds = sorted(table.seed.unique())
    order = [c for c in CONFIG_NAMES if c in set(table.config)]
    lines = [
        "# The claim at convergence (issue 24)",
        "",
        "`bash experiments/convergence_bench.sh runs/convergence`, then `.venv/bin/python "
        "experiments/summarize_convergence.py runs/convergence`. Ten Wycliffe books, at most 40 training documents "
        "per book (372 documents of ≤ 64 tokens before chunking), 12 validation and 12 test documents per book, "
        "split seed 0; MAP (learned τ: VI, --guide-lr 0.05), early stopping after 4 validations (every 25 steps) "
        "without a better validation log-likelihood, at most 600 steps, the best validated state kept. "
        "The runs shared the machine's 2 cores with other jobs: wall times are upper bounds.",
        "",
        "| run | seeds | test ppl | task-macro | best step | steps run | wall (s) | τ posterior: median [90%] | "
        "τ-averaged test ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in order:
        part = table[table.config == config]
        fmt = lambda col, part=part: (
            f"{part[col].mean():.2f}" if len(part) == 1 else f"{part[col].mean():.2f} ± {part[col].std():.2f}"
        )
        tau = (
            ""
            if part.get("tau_median") is None or part.tau_median.isna().all()
            else "; ".join(f"{r.tau_median:.3g} [{r.tau_q05:.3g}, {r.tau_q95:.3g}]" for r in part.itertuples())
        )
        averaged = (
            ""
            if "tau_averaged_test_ppl" not in part or part.tau_averaged_test_ppl.isna().all()
            else fmt("tau_averaged_test_ppl")
        )
        lines.append(
            f"| {CONFIG_NAMES[config]} | {len(part)} | {fmt('test_ppl')} | {fmt('test_macro_ppl')} | "
            f"{', '.join(str(int(s)) for s in part.best_step)} | {', '.join(str(int(s)) for s in part.steps)} | "
            f"{', '.join(f'{s:.0f}' for s in part.wall_seconds)} | {tau} | {averaged} |"
        )
    lines += ["", "Paired differences of held-out log-likelihood (per seed; positive: the first run is better):", ""]
    lines += [
        "| seed | comparison | Δ elpd (nats) | SE over documents | SE over books | Δ ppl |",
        "|---|---|---|---|---|---|",
    ]
    reference = args.reference
    for seed in seeds:
        present = {name: t for (name, s), t in docs.items() if s == seed}
        if reference not in present:
            continue
        for other in present:
            if other == reference:
                continue
            cmp = compare_runs({reference: present[reference], other: present[other]})
            first, second = cmp.index
            d = cmp.loc[second]
            sign = 1 if first == reference else -1
            tokens = present[reference].tokens.sum()
            dppl = math.exp(-present[reference].elpd.sum() / tokens) - math.exp(-present[other].elpd.sum() / tokens)
            lines.append(
                f"| {seed} | {reference} vs {other} | {sign * d.elpd_diff:+.1f} | {d.se_docs:.1f} | {d.se_tasks:.1f} | "
                f"{dppl:+.2f} |"
            )
    (out / "convergence_bench.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in order:
        part = (
            per_book[per_book.config == config]
            .groupby("task")
            .agg(tokens=("n_train_tokens", "first"), ppl=("test_ppl", "mean"))
        )
        part = part.sort_values("tokens")
        ax.plot(part.tokens, part.ppl, "o-", label=CONFIG_NAMES[config])
    ax.set_xscale("log")
    ax.set_xlabel("training tokens of the book")
    ax.set_ylabel("test perplexity (mean over seeds)")
    ax.set_title("At convergence: per book against its size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "convergence_bench.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs")
    parser.add_argument("--reference", default="tau10", help="the configuration every other is paired against")
    parser.add_argument("--out", default="experiments/results/convergence_bench")
    main(parser.parse_args())
