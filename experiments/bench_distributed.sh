#!/usr/bin/env bash
# Training throughput of 1 vs 2 data-parallel processes (gloo) on this machine, same global batches.
# The 2-core CPU gives each of the 2 processes one core, so expect little gain: the point is correctness.
#   bash experiments/bench_distributed.sh [MODEL]      (default smollm2-135m; ~3 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
OUT=experiments/results/bench/distributed
ARGS=(train --model "$MODEL" --steps 12 --batch-size 8 --eval-every 12 --max-eval-docs 2 --posterior-samples 0
      --no-progress --overwrite --no-task-subsampling)  # as measured (before task subsampling)
OMP_NUM_THREADS=2 .venv/bin/bora-pyro "${ARGS[@]}" --out "$OUT/one" > /dev/null
OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m bora_pyro.cli \
    "${ARGS[@]}" --distributed --out "$OUT/two" > /dev/null
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
m = {k: json.loads((out / k / "metrics.json").read_text()) for k in ("one", "two")}
lines = [f"| processes | train tokens/s | train seconds | test ppl |", "|---|---|---|---|"]
lines += [f"| {v['processes']} | {v['train_tokens_per_second']:.1f} | {v['train_seconds']:.1f} | {v['test_ppl']:.2f} |"
          for v in m.values()]
lines.append(f"\nspeed-up of 2 processes: {m['two']['train_tokens_per_second'] / m['one']['train_tokens_per_second']:.2f}x")
(out / "distributed.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
