"""Which start of a VI guide's scales lets them converge in a realistic budget?

Trains ``--inference vi`` runs that differ only in ``--guide-init-scale`` and reports, from each run's
per_task.csv, how far the guide's sds got towards their converged value 1/sqrt(lambda + tau) (the curvature
pass's lambda): the median ratio over coordinates and tasks, the share still below half of it, and the
plug-in and posterior-predictive test perplexity.

    .venv/bin/python experiments/guide_init_scale.py --model smollm2-135m --scales 0.001,0.01,0.1,1 \
        --out experiments/results/guide_init_scale

Writes guide_init_scale.csv and guide_init_scale.md (run folders under --runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


def main(args: argparse.Namespace) -> None:
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in args.scales.split(","):
        folder = runs / f"scale={scale}"
        if not (folder / "status.json").is_file() or '"complete"' not in (folder / "status.json").read_text():
            command = [
                sys.executable,
                "-m",
                "bora_pyro.cli",
                "train",
                "--model",
                args.model,
                "--inference",
                "vi",
                "--tau",
                args.tau,
                "--steps",
                str(args.steps),
                "--guide-init-scale",
                scale,
                "--split-seed",
                "0",
                "--no-progress",
                "--out",
                str(folder),
                "--overwrite",
                *args.extra.split(),
            ]
            subprocess.run(command, check=True)
        per_task = pd.read_csv(folder / "per_task.csv")
        metrics = json.loads((folder / "metrics.json").read_text())
        rows.append(
            {
                "init_scale": float(scale),
                "scale_ratio_median": float(per_task.scale_ratio.median()),
                "scale_ratio_min": float(per_task.scale_ratio.min()),
                "unconverged_share": float(per_task.scale_unconverged.mean()),
                "test_ppl": metrics["test_ppl"],
                "posterior_predictive_test_ppl": metrics.get("posterior_predictive_test_ppl"),
                "tau_median": metrics.get("tau_median"),
                "wall_seconds": metrics["wall_seconds"],
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "guide_init_scale.csv", index=False)
    lines = [
        f"# Start of the VI guide's scales ({args.model}, tau = {args.tau}, {args.steps} steps)",
        "",
        f"`.venv/bin/python experiments/guide_init_scale.py --model {args.model} --scales {args.scales} "
        f"--steps {args.steps}`. scale ratio: the guide's sd over its converged value 1/sqrt(lambda + tau) "
        "(1 = converged), median over every coordinate of every task; unconverged: the share below 0.5.",
        "",
        "| --guide-init-scale | scale ratio (median) | lowest task's median | unconverged | test ppl | "
        "posterior-predictive test ppl | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.init_scale:g} | {r.scale_ratio_median:.3g} | {r.scale_ratio_min:.3g} | {r.unconverged_share:.1%} | "
        f"{r.test_ppl:.2f} | {r.posterior_predictive_test_ppl:.2f} | {r.wall_seconds:.0f} |"
        for r in table.itertuples()
    ]
    (out / "guide_init_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--tau", default="100")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--scales", default="0.001,0.01,0.1,1")
    parser.add_argument("--extra", default="", help="more train options, space-separated")
    parser.add_argument("--runs", default="runs/guide_init_scale")
    parser.add_argument("--out", default="experiments/results/guide_init_scale")
    main(parser.parse_args())
