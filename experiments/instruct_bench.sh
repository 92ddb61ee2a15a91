#!/usr/bin/env bash
# The instruction benchmark (issue 23): bible-translate on the embedded SmolLM2-135M-Instruct with its chat template.
# Six tasks = target translations of very unequal size (wyc 3000 pairs ... roth 20), the same 24 fixed test verses each.
# Every run: 100 steps of 8 examples (the main job's budget), <= 160 tokens, scored on the completions (test
# perplexity) and by 24 greedy answers per task (chrF, exact match).
#   bash experiments/instruct_bench.sh [OUT=runs/instruct] [SEEDS="0"] [CONFIGS="tau0 tau10 tau100 tauinf pooled_prompt whole_text"]
# then: python experiments/summarize_instruct.py OUT
set -euo pipefail
OUT=${1:-runs/instruct}
SEEDS=${SEEDS:-0}
CONFIGS=${CONFIGS:-"tau0 tau10 tau100 tauinf pooled_prompt whole_text"}
BORA=${BORA:-.venv/bin/bora-pyro}
COMMON=(--model smollm2-135m --data bible-translate --max-tokens 160 --max-eval-docs 24 --steps 100 --batch-size 8
        --eval-every 25 --split-seed 0)
options() {
  case $1 in
    tau0) echo "--tau 0" ;;
    tau10) echo "--tau 10" ;;
    tau100) echo "--tau 100" ;;
    tauinf) echo "--tau inf" ;;
    pooled_prompt) echo "--tau inf --task-prompt [{task}]_" ;;  # "_" becomes a space below
    whole_text) echo "--tau 10 --no-completion-only-loss" ;;
    *) echo "unknown config $1" >&2; exit 2 ;;
  esac
}
mkdir -p "$OUT"
for seed in $SEEDS; do
  for config in $CONFIGS; do
    run="$OUT/$config-seed$seed"
    if [ -f "$run/generation_per_task.csv" ]; then echo "done: $run"; continue; fi
    read -r -a extra <<< "$(options "$config")"
    for i in "${!extra[@]}"; do extra[$i]=${extra[$i]//_/ }; done
    start=$(date +%s)
    "$BORA" train "${COMMON[@]}" "${extra[@]}" --seed "$seed" --out "$run" --overwrite
    "$BORA" evaluate "$run" --generate 24 --max-new-tokens 40 > "$run.evaluate.txt"
    echo "$(( $(date +%s) - start ))" > "$run.seconds"
    tail -2 "$run.evaluate.txt"
  done
done
