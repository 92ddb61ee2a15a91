#!/usr/bin/env bash
# The paper's tau sweep on the embedded default (SmolLM2-135M, ten Wycliffe books), CPU-sized,
# then the convergence comparison of parameterisation / learning-rate policies.
# About 90 minutes on a 2-core CPU; results (tables, figures, per-run logs) under experiments/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=experiments/results/sweep_smollm2
.venv/bin/bora-pyro sweep --taus 0,1,10,100,1000,inf --steps 80 --eval-every 10 --max-eval-docs 6 --no-task-subsampling \
    --no-progress --out "$SWEEP"
.venv/bin/python experiments/convergence.py --sweep "$SWEEP" --taus 100,1000 \
    --out experiments/results/convergence
