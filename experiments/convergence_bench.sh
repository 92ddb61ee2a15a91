#!/usr/bin/env bash
# The claim at convergence (issue 24): the ten Wycliffe books with at most 40 training documents per book (so that
# training converges on this CPU), early stopping on validation (patience 4 validations of 12 documents per book,
# every 25 steps, at most 600 steps), against the practitioner's baseline (one pooled adapter with a task prompt).
#   bash experiments/convergence_bench.sh [OUT=runs/convergence] [SEEDS="0 1 2"] [CONFIGS="tau0 tau10 tau100 tauinf pooled_prompt tau10_prompt learn"]
# then: python experiments/summarize_convergence.py OUT
set -euo pipefail
OUT=${1:-runs/convergence}
SEEDS=${SEEDS:-"0 1 2"}
CONFIGS=${CONFIGS:-"tau0 tau10 tau100 tauinf pooled_prompt tau10_prompt learn"}
BORA=${BORA:-.venv/bin/bora-pyro}
COMMON=(--max-train-docs 40 --max-eval-docs 12 --steps 600 --eval-every 25 --patience 4 --split-seed 0 --no-progress)
declare -A OPTIONS=(
  [tau0]="--tau 0"
  [tau10]="--tau 10"
  [tau100]="--tau 100"
  [tauinf]="--tau inf"
  [pooled_prompt]="--tau inf --task-prompt {task}:_"  # "_" becomes a space below
  [tau10_prompt]="--tau 10 --task-prompt {task}:_"
  [learn]="--tau learn --inference vi --guide-lr 0.05"
)
mkdir -p "$OUT"
for seed in $SEEDS; do
  for config in $CONFIGS; do
    [ -n "${OPTIONS[$config]:-}" ] || { echo "unknown config $config" >&2; exit 2; }
    run="$OUT/$config-seed$seed"
    grep -qs '"status": "complete"' "$run/status.json" && { echo "done: $run"; continue; }
    read -r -a extra <<< "${OPTIONS[$config]}"
    extra=("${extra[@]//_/ }")
    "$BORA" train "${COMMON[@]}" "${extra[@]}" --seed "$seed" --out "$run" --overwrite | tail -4
  done
done
