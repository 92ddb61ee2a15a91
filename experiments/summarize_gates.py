"""The B-LoRA gates' table (and one figure per gated run) from run folders, into OUT/summary.md.

    .venv/bin/python experiments/summarize_gates.py --out experiments/results/gates plain=PATH rank=PATH ...

The first run is the reference (plain BoRA): each row shows its test perplexity relative to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bora_pyro.evaluation.plots import plot_gates


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(item.split("=", 1) for item in args.runs)
    reference = None
    rows = []
    for name, folder in runs.items():
        folder = Path(folder)
        m = json.loads((folder / "metrics.json").read_text())
        reference = reference or m["test_ppl"]
        change = 100 * (m["test_ppl"] / reference - 1)
        rows.append(
            f"| {name} | {m['test_ppl']:.1f} | {m['test_macro_ppl']:.1f} | {change:+.2f}% "
            f"| {m.get('gates_mean_rank', 8):.2f} | {m.get('gates_rank_by_module', '')} | "
            f"{m.get('gates_weight_bits', {32: 'all'})} | {m.get('gates_activation_bits', {32: 'all'})} | "
            f"{m.get('relative_bops', 1.0):.3f} | {m['train_seconds']:.0f} | {m['wall_seconds']:.0f} |"
        )
        if (folder / "gates.csv").exists():
            plot_gates(pd.read_csv(folder / "gates.csv"), out / f"gates_{name}.png", f"BoRA + B-LoRA gates: {name}")
    table = (
        "| run | test ppl | macro ppl | vs first | mean rank | rank by module | weight bits (layers) | "
        "activation bits (layers) | relative BOPs | train s | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, the reference first")
    main(parser.parse_args())
