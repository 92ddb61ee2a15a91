#!/usr/bin/env bash
# The collapsed tau posterior on the ten Wycliffe books (issue 24), at the main job's settings on the split of
# experiments/results/seeds_books10 (split seed 0, 24 held-out documents per book): tau = 100 (MAP) for training
# seeds 0, 1, 2, and seed 0 for 300 steps (is the posterior stable under more steps?). Each run writes its
# tau_posterior.csv, tau_q05/median/q95 and tau_averaged_test_ppl; a refreshed posterior is taken afterwards by
# experiments/summarize_books_tau.py.
#   bash experiments/books_tau_posterior.sh [OUT=runs/books]
set -euo pipefail
OUT=${1:-runs/books}
BORA=${BORA:-.venv/bin/bora-pyro}
COMMON=(--tau 100 --split-seed 0 --max-eval-docs 24 --no-progress)
run() {  # folder, then options
  local out=$1
  shift
  grep -qs '"status": "complete"' "$out/status.json" && { echo "done: $out"; return 0; }
  "$BORA" train "${COMMON[@]}" "$@" --out "$out" --overwrite | tail -3
}
for seed in 0 1 2; do run "$OUT/tau100-seed$seed" --seed "$seed"; done
run "$OUT/tau100-seed0-steps300" --seed 0 --steps 300 --eval-every 50
