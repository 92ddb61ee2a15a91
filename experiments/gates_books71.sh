#!/usr/bin/env bash
# The B-LoRA gates' start (log-alpha 3, the default when measured, against 6, the default since) on the second
# corpus: every book of the Wycliffe Bible (71 tasks), with the settings of the 71-book tau grid in
# experiments/seeds.sh (tau = 100, seed 0, split seed 0, 100 steps, training documents capped at 100 per book,
# 24 validation and test documents per book).
# Rank and weight-precision gates at lambda = 100 (where they prune on the ten books), --guide-lr 0.1 as in
# experiments/gates.sh. The reference is the grid's plain tau = 100 run of seed 0 (RUNS/seeds_books71): run
# experiments/seeds.sh's third block first. About 30 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RUNS:-runs}
for INIT in 3 6; do
  .venv/bin/bora-pyro train --books all --max-train-docs 100 --eval-every 100 --split-seed 0 --max-eval-docs 24 \
    --no-progress --guide-lr 0.1 --rank-gates --quant-gates weights --rank-lambda 100 --quant-lambda 100 \
    --gate-init $INIT --out "$R/gates71/init$INIT"
done
.venv/bin/python experiments/summarize_gates.py --out experiments/results/gates_books71 \
  "plain=$R/seeds_books71/seed=0/runs/tau=100" "lambda100_init3=$R/gates71/init3" "lambda100_init6=$R/gates71/init6"
