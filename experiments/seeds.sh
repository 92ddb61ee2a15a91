#!/usr/bin/env bash
# The paper's claim with error bars (issue 15) and a many-task run (issue 16), as measured on this project's
# 2-core CPU. Each block is resumable (a finished run is not rerun). Results are summarised into
# experiments/results/ by experiments/summarize_seeds.py.
#   1. tau in {0, 10, 100, 1000, inf} x training seeds {0, 1, 2} on one split, ten Wycliffe books
#      (the main job's settings: 100 steps of 8 x <= 64 tokens), 24 validation and test documents per book;
#   2. learned tau (VI) on the same split and seeds (--guide-lr 0.05, chosen on seed 0 against 0.2, which was unstable);
#   3. every book of the Wycliffe Bible (71 with the deuterocanonical books), training documents capped at 100
#      per book so that in 100 steps of 8 documents nearly every book is drawn, one validation at the end;
#   4. 1,304 chapters of the Wycliffe Bible as tasks: tau = 100 against tau = 0 and tau = inf.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RUNS:-runs}
COMMON=(--split-seed 0 --max-eval-docs 24 --no-progress)
.venv/bin/bora-pyro sweep --taus 0,10,100,1000,inf --seeds 0,1,2 "${COMMON[@]}" --out "$R/seeds_books10"
for S in 0 1 2; do
  .venv/bin/bora-pyro train --tau learn --inference vi --guide-lr "${GUIDE_LR:-0.05}" --seed $S "${COMMON[@]}" \
    --out "$R/learned10/glr=${GUIDE_LR:-0.05}/seed=$S"
done
.venv/bin/bora-pyro sweep --books all --max-train-docs 100 --eval-every 100 --taus 0,10,100,1000,inf --seeds 0,1,2 \
  "${COMMON[@]}" --out "$R/seeds_books71"
for TAU in 100 0 inf; do
  .venv/bin/bora-pyro train --data bible-chapters --tau $TAU --task-store disk --max-eval-docs 1 --eval-every 100 --split-seed 0 \
    --no-progress --out "$R/chapters/tau=$TAU"
done
