#!/usr/bin/env bash
# B-LoRA gates inside BoRA on the embedded default (the main job's settings: tau = 100, MAP, rank 8,
# 100 steps): plain BoRA against learned rank gates (shared by the tasks) and learned rank + weight and
# activation precision gates at B-LoRA's lambda = 1 (gates starting at log-alpha 3, the default when this was
# measured, and at 6: less early noise, the default since), and rank + weight precision gates at lambda = 100
# (log-alpha 3 and 6) and 1000
# (our likelihood sums over all training tokens, so one nat per gate is a much weaker prior than in
# B-LoRA's mean-loss objective). The gates' log-alphas learn at --guide-lr 0.1 (at the default 0.01 a
# gate moves by at most 1 in 100 steps and none could close). About 70 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/gates
COMMON=(--no-progress --overwrite --guide-lr 0.1)
.venv/bin/bora-pyro train "${COMMON[@]}" --out "$OUT/runs/plain"
.venv/bin/bora-pyro train "${COMMON[@]}" --rank-gates --gate-init 3 --out "$OUT/runs/rank"
.venv/bin/bora-pyro train "${COMMON[@]}" --rank-gates --quant-gates weights+activations --gate-init 3 \
    --out "$OUT/runs/rank+quant"
.venv/bin/bora-pyro train "${COMMON[@]}" --rank-gates --quant-gates weights+activations --gate-init 6 \
    --out "$OUT/runs/rank+quant_init6"
for LAMBDA in 100 1000; do
  .venv/bin/bora-pyro train "${COMMON[@]}" --rank-gates --quant-gates weights --rank-lambda $LAMBDA --quant-lambda $LAMBDA \
      --gate-init 3 --out "$OUT/runs/rank+quant_lambda$LAMBDA"
done
.venv/bin/bora-pyro train "${COMMON[@]}" --rank-gates --quant-gates weights --rank-lambda 100 --quant-lambda 100 \
    --gate-init 6 --out "$OUT/runs/rank+quant_lambda100_init6"
.venv/bin/python experiments/summarize_gates.py --out "$OUT" \
  $(for NAME in plain rank rank+quant rank+quant_init6 rank+quant_lambda100 rank+quant_lambda100_init6 \
      rank+quant_lambda1000; do echo "$NAME=$OUT/runs/$NAME"; done)
