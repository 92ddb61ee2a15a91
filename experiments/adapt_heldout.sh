#!/usr/bin/env bash
# Onboarding new tasks the Bayesian way: three books NOT in the sweep (Mark, Hebrews, Proverbs), each
# with only 10 training documents, adapted under the prior of the sweep's tau = 10 run (Theta fixed),
# against the same three books trained alone (tau = 0: each book its own LoRA from the standard start)
# with the same steps, and the base model. About 12 minutes on a 2-core CPU after paper_sweep.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=experiments/results/sweep_smollm2/runs/tau=10
OUT=experiments/results/adapt_heldout
BOOKS=Mark,Hebrews,Proverbs
.venv/bin/bora-pyro adapt "$SOURCE" --data bible-books --books "$BOOKS" --max-train-docs 10 --max-eval-docs 8 \
    --steps 40 --eval-every 10 --no-progress --overwrite --out "$OUT/adapted"
.venv/bin/bora-pyro train --data bible-books --books "$BOOKS" --max-train-docs 10 --max-eval-docs 8 --tau 0 \
    --steps 40 --eval-every 10 --max-tokens 64 --posterior-samples 0 --no-progress --overwrite --no-task-subsampling \
    --out "$OUT/alone"
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
a, b = (pd.read_csv(out / k / "per_task.csv").set_index("task") for k in ("adapted", "alone"))
table = pd.DataFrame({"train docs": a.n_train_docs, "base test ppl": a.base_test_ppl,
                      "alone (tau=0) test ppl": b.test_ppl, "adapted test ppl": a.test_ppl})
lines = ["| book | train docs | base | trained alone | adapted under the sweep's prior |", "|---|---|---|---|---|"]
lines += [f"| {t} | {int(r['train docs'])} | {r['base test ppl']:.1f} | {r['alone (tau=0) test ppl']:.1f} | "
          f"**{r['adapted test ppl']:.1f}** |" for t, r in table.iterrows()]
(out / "adapt_heldout.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
