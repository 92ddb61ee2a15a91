"""Summarise experiments/books_tau_posterior.sh: the collapsed tau posterior on the ten Wycliffe books.

For each run: the posterior written at training (sampled Fisher, 32 documents per book, at the run's adapters),
the same refreshed once (messages re-taken at E[theta_d | tau = median]), and with the empirical Fisher; the
test perplexity of the tau-averaged adapters against the grid's best tau (10, MAP, the same split and training
seed, from experiments/results/seeds_books10), paired by seed.

    .venv/bin/python experiments/summarize_books_tau.py runs/books --out experiments/results/books_tau

Writes books_tau.csv and books_tau.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import bora_pyro

GRID = Path("experiments/results/seeds_books10")


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in sorted(Path(args.runs).glob("tau100-seed*")):
        status = folder / "status.json"
        if not status.is_file() or '"complete"' not in status.read_text():
            print(f"skipped (not complete): {folder}")
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        seed = int(folder.name.split("-seed")[1].split("-")[0])
        run = bora_pyro.load_run(folder)
        start = time.perf_counter()
        posterior = run.tau_posterior()  # with this code, not the one the run was trained with
        seconds = time.perf_counter() - start
        first = posterior.quantiles((0.05, 0.5, 0.95))[0]
        factors = {k: v.to(run.bora.device) for k, v in posterior.mean_factors().items()}
        averaged = bora_pyro.evaluate(run.bora, run.corpus.test, factors=factors).token_weighted
        refreshed = run.tau_posterior(refresh=True).quantiles((0.05, 0.5, 0.95))[0]
        empirical = run.tau_posterior(fisher="empirical").quantiles((0.05, 0.5, 0.95))[0]
        grid = json.loads((GRID / f"seed={seed}" / "runs" / "tau=10" / "metrics.json").read_text())
        rows.append(
            {
                "run": folder.name,
                "seed": seed,
                "steps": metrics["steps"],
                "test_ppl": metrics["test_ppl"],
                "tau_q05": first[0],
                "tau_median": first[1],
                "tau_q95": first[2],
                "stationarity": posterior.messages.stationarity,
                "refreshed_q05": refreshed[0],
                "refreshed_median": refreshed[1],
                "refreshed_q95": refreshed[2],
                "empirical_median": empirical[1],
                "tau_averaged_test_ppl": averaged,
                "grid_best_test_ppl": grid["test_ppl"],
                "collapsed_seconds": seconds,
                "wall_seconds": metrics["wall_seconds"],
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "books_tau.csv", index=False)
    lines = [
        "# The collapsed posterior of tau on the ten Wycliffe books",
        "",
        "`bash experiments/books_tau_posterior.sh runs/books`, then `.venv/bin/python "
        "experiments/summarize_books_tau.py runs/books`. The main job's settings (SmolLM2-135M, 100 steps of 8 "
        "documents of ≤ 64 tokens, MAP at τ = 100) on the split of the seed study (split seed 0, 24 held-out "
        "documents per book); the grid's best τ is 10 on validation in every seed (experiments/results/seeds_books10).",
        "",
        "| run | steps | τ posterior: median [90%] | refreshed once | empirical Fisher (median) | "
        "test ppl at τ = 100 | τ-averaged test ppl | grid's best (τ = 10) test ppl | wall (s) | "
        "τ posterior (s, 1 thread) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.run} | {r.steps} | {r.tau_median:.3g} [{r.tau_q05:.3g}, {r.tau_q95:.3g}] | {r.refreshed_median:.3g} "
        f"[{r.refreshed_q05:.3g}, {r.refreshed_q95:.3g}] | {r.empirical_median:.3g} | {r.test_ppl:.2f} | "
        f"{r.tau_averaged_test_ppl:.2f} | {r.grid_best_test_ppl:.2f} | {r.wall_seconds:.0f} | "
        f"{r.collapsed_seconds:.0f} |"
        for r in table.itertuples()
    ]
    base = table[table.steps == table.steps.min()]
    diff = (base.tau_averaged_test_ppl - base.grid_best_test_ppl).to_numpy()
    rel = (base.tau_averaged_test_ppl / base.grid_best_test_ppl - 1).to_numpy()
    if len(diff) > 1:
        lines += [
            "",
            f"- τ-averaged adapters of the τ = 100 fit against the grid's best, paired by seed ({len(diff)} seeds): "
            f"{diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.2f} perplexity (mean ± SE), "
            f"{rel.mean():+.1%} ({', '.join(f'{x:+.1%}' for x in rel)}).",
        ]
    (out / "books_tau.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs")
    parser.add_argument("--out", default="experiments/results/books_tau")
    main(parser.parse_args())
