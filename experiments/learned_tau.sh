#!/usr/bin/env bash
# Variational BoRA on the embedded default, with the paper sweep's settings (80 steps, 6 eval docs
# per book): a learned tau against fixed tau = 10 (the sweep's best) and tau = 100, all with the
# AutoNormal guide, then the ArviZ comparison of the three. About 25 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/learned_tau
COMMON=(--inference vi --guide-lr 0.05 --steps 80 --eval-every 10 --max-eval-docs 6 --no-progress --overwrite
        --no-task-subsampling)  # as measured (before task subsampling became the default)
.venv/bin/bora-pyro train --tau learn "${COMMON[@]}" --out "$OUT/runs/learn"
.venv/bin/bora-pyro train --tau 10 "${COMMON[@]}" --out "$OUT/runs/tau=10"
.venv/bin/bora-pyro train --tau 100 "${COMMON[@]}" --out "$OUT/runs/tau=100"
.venv/bin/bora-pyro diagnose "$OUT/runs/learn" "$OUT/runs/tau=10" "$OUT/runs/tau=100" --out "$OUT"
