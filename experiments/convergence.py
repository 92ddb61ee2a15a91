"""Does non-centring equalise convergence across tau without the paper's lr ~ tau rule?

For every finite tau, the number of steps to reach within 1% of the final validation perplexity
under three policies, all with the settings of an existing sweep:
  (non-centred, fixed lr)  = the sweep itself (reused, not rerun)
  (centred, fixed lr)
  (centred, lr ~ tau)      the paper's rule, lr = lr0 * tau / lr_tau_reference

    .venv/bin/python experiments/convergence.py --sweep experiments/results/sweep_smollm2 \
        --taus 100,1000 --out experiments/results/convergence

Writes convergence.csv, convergence.md and convergence.png in --out (each policy's runs in a
resumable sweep folder under it).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from bora_pyro.sweep import collect, load_sweep_spec, parse_taus, run_sweep


def steps_to_converge(curve: pd.DataFrame, tolerance: float = 0.01) -> int:
    """First validated step whose perplexity is within ``tolerance`` of the final validation perplexity
    (``curve``: columns step and valid_ppl, one row per validation, in step order)."""
    final = curve.valid_ppl.iloc[-1]
    reached = curve[curve.valid_ppl <= (1 + tolerance) * final]
    return int(reached.step.iloc[0])


def main(args: argparse.Namespace) -> None:
    base = load_sweep_spec(args.sweep)
    out = Path(args.out)
    taus = parse_taus(args.taus)
    policies = {"non-centred, fixed lr": Path(args.sweep)}
    for name, folder, lr_tau in (
        ("centred, fixed lr", "centered_fixed_lr", False),
        ("centred, lr ~ tau", "centered_lr_tau", True),
    ):
        spec = replace(
            base,
            prior=replace(base.prior, parameterization="centered"),
            train=replace(base.train, lr_tau_scaling=lr_tau),
        )
        run_sweep(spec, taus, out / folder)
        policies[name] = out / folder
    rows = []
    for name, folder in policies.items():
        table, _, curves = collect(folder)
        for tau in taus:
            curve = curves[curves.tau == tau]
            if curve.empty:
                raise SystemExit(f"{folder} has no finished run at tau={tau:g}")
            row = table[table.tau == tau].iloc[0]
            rows.append(
                {
                    "policy": name,
                    "tau": tau,
                    "lr": row.lr,
                    "steps_to_1pct": steps_to_converge(curve),
                    "final_valid_ppl": curve.valid_ppl.iloc[-1],
                    "test_ppl": row.test_ppl,
                }
            )
    result = pd.DataFrame(rows)
    result.to_csv(out / "convergence.csv", index=False)
    wide = result.pivot(index="tau", columns="policy", values="steps_to_1pct")
    ppl = result.pivot(index="tau", columns="policy", values="final_valid_ppl")
    lines = [
        "# Steps to reach within 1% of the final validation perplexity",
        "",
        "| tau | " + " | ".join(wide.columns) + " |",
        "|---|" + "---|" * len(wide.columns),
    ]
    lines += [
        f"| {tau:g} | " + " | ".join(f"{wide.loc[tau, c]} (ppl {ppl.loc[tau, c]:.1f})" for c in wide.columns) + " |"
        for tau in wide.index
    ]
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(taus), figsize=(4.5 * len(taus), 4), sharey=True, squeeze=False)
    for ax, tau in zip(axes[0], taus):
        for name, folder in policies.items():
            _, _, curves = collect(folder)
            curve = curves[curves.tau == tau]
            ax.plot(curve.step, curve.valid_ppl, "o-", ms=3, label=name)
        ax.set_title(f"τ = {tau:g}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("validation perplexity (log)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="a finished non-centred, fixed-lr sweep folder")
    parser.add_argument("--taus", default="10,100,1000")
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
