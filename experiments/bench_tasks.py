"""Step time, peak memory, checkpoint and export cost against the number of tasks D (issue: thousands of
tasks on one machine).

Each configuration runs in its own process (peak memory is per process): SmolLM2-135M, rank 8 on
q_proj+v_proj, batches of 8 x 128 random tokens whose tasks are drawn at random among the D tasks (the
same draws for every D). The timed step is ``bora_pyro.inference.svi.TrainStep``, the step ``fit`` runs;
the per-step cost is the slope of the wall time between ``--short`` and ``--long`` steps, so start-up and
allocation cancel. The configurations are run in turn (A B C ... A B C ...) ``--repeats`` times; the
median and the range of the slopes are reported. The task store is chosen as users get it ("auto":
memory-mapped files above 8 GB of task tables), or forced with ``--task-store``. After the timed steps a
D-task process also times a checkpoint (write time and size), writing the adapters file (streamed), and
exporting one task from it as a PEFT adapter. As ``fit`` does, each step is told the next step's tasks,
whose rows a disk store starts reading while the step computes; a configuration ``D/no-prefetch`` (e.g.
``--tasks 10,10000,10000/no-prefetch``) times the same steps without that read-ahead.

    .venv/bin/python experiments/bench_tasks.py --tasks 10,100,1000,10000,30000 --out experiments/results/bench_tasks
    .venv/bin/python experiments/bench_tasks.py --model tiny-random-llama --tasks 10,1000 --short 1 --long 3   # CI
    .venv/bin/python experiments/bench_tasks.py --tasks 10,10000,10000/no-prefetch --adapters-up-to 0 \
        --out experiments/results/bench_tasks_prefetch
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bora_pyro.io.task_store import STORES


def disk_bytes(folder: Path) -> int:
    """Bytes on disk (allocated blocks: sparse files count what is written) under ``folder``."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def run_peft(args) -> dict:
    """Single-adapter PEFT LoRA step on the same batches: the floor for time and memory."""
    import peft

    import bora_pyro
    from bora_pyro.models.likelihood import token_log_probs

    lm, tokenizer = bora_pyro.load_base_model(args.model, device="cpu")
    model = peft.get_peft_model(lm, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = make_batches(tokenizer, 1, args)

    def step(batch, upcoming) -> None:
        opt.zero_grad(set_to_none=True)
        (-token_log_probs(model(input_ids=batch.input_ids).logits, batch.labels).sum()).backward()
        opt.step()

    return time_steps(step, batches, args)


def make_batches(tokenizer, num_tasks: int, args) -> list:
    """``--long`` batches of 8 x ``--tokens`` random ids, tasks drawn at random (one seeded draw per step)."""
    from bora_pyro.data.batching import Batch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.long):
        ids = torch.randint(10, min(len(tokenizer), 5000), (8, args.tokens), generator=g)
        draw = torch.randint(0, 2**31 - 1, (8,), generator=g) % num_tasks
        docs_per_task = torch.full((num_tasks,), 100)
        out.append(
            Batch(
                ids, torch.ones_like(ids), ids.clone(), draw, torch.arange(8), int(docs_per_task.sum()), docs_per_task
            )
        )
    return out


def time_steps(step, batches, args) -> dict:
    """Wall time to finish each step (``step(batch, next_batch)``; the last one's next batch is None); the
    slope between --short and --long steps, and peak RSS."""
    start, done = time.perf_counter(), []
    for batch, upcoming in zip(batches, [*batches[1:], None]):
        step(batch, upcoming)
        done.append(time.perf_counter() - start)
    slope = (done[args.long - 1] - done[args.short - 1]) / (args.long - args.short)
    return {"step_s": slope, "peak_rss_bytes": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (mapped file pages included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_config(config: str) -> tuple[int, bool]:
    """ "D" or "D/no-prefetch" -> (D, whether steps read the next step's rows ahead)."""
    tasks, _, variant = config.partition("/")
    if variant not in ("", "no-prefetch"):
        raise SystemExit(f"configuration {config!r}: expected D or D/no-prefetch")
    return int(tasks), variant == ""


def run_bora(config: str, args) -> dict:
    import bora_pyro
    from bora_pyro.inference import TrainConfig
    from bora_pyro.inference.checkpoint import LoopState, save_checkpoint
    from bora_pyro.inference.svi import TrainStep
    from bora_pyro.io.artifacts import save_adapters
    from bora_pyro.io.export import export_peft
    from bora_pyro.models.adapter import AdapterConfig
    from bora_pyro.models.readout import iter_task_factors
    from bora_pyro.runs.build import build_model
    from bora_pyro.runs.spec import RunSpec

    num_tasks, prefetch = parse_config(config)
    work = Path(tempfile.mkdtemp(prefix="bench-tasks-", dir=args.scratch))
    try:
        lm, tokenizer = bora_pyro.load_base_model(args.model, device="cpu")
        spec = RunSpec(model=args.model, adapter=AdapterConfig(task_store=args.task_store))
        bora = build_model(spec, lm, [f"t{d}" for d in range(num_tasks)], store_folder=work / "store")
        batches = make_batches(tokenizer, num_tasks, args)
        train_step = TrainStep(bora, TrainConfig(), batches[0], total_tokens=100 * num_tasks * args.tokens)
        if bora.task_store.disk:
            bora.task_store.begin(0)  # as a run that checkpoints: the undo log is written every step
        counter = iter(range(1, 10**9))
        result = time_steps(
            lambda b, upcoming: train_step(
                b, next(counter), next_tasks=upcoming.task_index if prefetch and upcoming is not None else None
            ),
            batches,
            args,
        )
        result["train_peak_rss_bytes"] = peak_rss()  # the training steps' peak, before checkpoint and export
        result.update(
            store=bora.task_store.kind, store_disk_bytes=disk_bytes(work / "store") if bora.task_store.disk else 0
        )
        with bora.param_scope():  # one checkpoint after the steps: what a checkpoint every N steps costs
            started = time.perf_counter()
            save_checkpoint(work / "ckpt", train_step.optimizer, LoopState(step=args.long), {}, {}, bora.task_store)
            result["checkpoint_s"] = time.perf_counter() - started
        result["checkpoint_bytes"] = disk_bytes(work / "ckpt")
        if args.adapters_up_to >= num_tasks:
            started = time.perf_counter()
            save_adapters(
                work / "adapters.safetensors",
                bora.tasks,
                iter_task_factors(bora, export=True),
                bora.global_factors(),
                {"rank": 8},
                shapes=bora.lora.shapes(),
            )
            result["adapters_write_s"] = time.perf_counter() - started
            result["adapters_bytes"] = (work / "adapters.safetensors").stat().st_size
            from bora_pyro.io.artifacts import AdapterFile

            started = time.perf_counter()
            adapters = AdapterFile(work / "adapters.safetensors")
            export_peft(bora.lora, bora.tasks, adapters.rows, None, args.model, work / "export", only=[bora.tasks[-1]])
            result["export_one_task_s"] = time.perf_counter() - started
        result["peak_rss_bytes"] = peak_rss()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(args) -> None:
    if args.one:
        out = run_peft(args) if args.one == "peft" else run_bora(args.one, args)
        print(json.dumps(out))
        return
    configs = ["peft"] + [str(d) for d in args.tasks.split(",")]
    rows = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            proc = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", config], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
            rows[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[config][-1]
            print(
                f"repeat {repeat} {config:>6}: {r['step_s']:.2f} s/step, peak RSS "
                f"{r.get('train_peak_rss_bytes', r['peak_rss_bytes']) / 2**30:.2f} GiB in the steps, "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB in all" + (f", store {r['store']}" if "store" in r else ""),
                flush=True,
            )
    summary = {}
    for config, runs in rows.items():
        steps = [r["step_s"] for r in runs]
        summary[config] = {
            "step_s_median": statistics.median(steps),
            "step_s_min": min(steps),
            "step_s_max": max(steps),
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
            "train_peak_rss_gib": max(r.get("train_peak_rss_bytes", r["peak_rss_bytes"]) for r in runs) / 2**30,
            **{k: v for k, v in runs[-1].items() if k not in ("step_s", "peak_rss_bytes", "train_peak_rss_bytes")},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_tasks.json").write_text(json.dumps({"args": vars(args), "runs": rows, "summary": summary}, indent=1))
    base = summary[configs[1]]["step_s_median"]
    lines = [
        f"# Step time and memory against the number of tasks ({args.model}, 8 x {args.tokens} tokens, rank 8, "
        f"q_proj+v_proj; slope of steps {args.short}..{args.long}, median [range] of {args.repeats} "
        "alternating repeats)",
        "",
        "| D | task store | step (s) | vs D=" + configs[1] + " | peak RSS in the steps (GiB) | vs PEFT | "
        "peak RSS with checkpoint and export (GiB) | store on disk (GB) | checkpoint (s / MB) | "
        "adapters file (s / GB) | export 1 task (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peft = summary["peft"]
    lines.append(
        f"| PEFT, 1 adapter | - | {peft['step_s_median']:.2f} [{peft['step_s_min']:.2f}, {peft['step_s_max']:.2f}] "
        f"| | {peft['peak_rss_gib']:.2f} | 1.00 | | | | | |"
    )
    for config in configs[1:]:
        s = summary[config]
        lines.append(
            f"| {config} | {s['store']} | {s['step_s_median']:.2f} [{s['step_s_min']:.2f}, {s['step_s_max']:.2f}] | "
            f"{s['step_s_median'] / base:.3f} | {s['train_peak_rss_gib']:.2f} | "
            f"{s['train_peak_rss_gib'] / peft['peak_rss_gib']:.2f} | {s['peak_rss_gib']:.2f} | "
            f"{s['store_disk_bytes'] / 1e9:.2f} | {s['checkpoint_s']:.2f} / {s['checkpoint_bytes'] / 1e6:.0f} | "
            + (
                f"{s['adapters_write_s']:.0f} / {s['adapters_bytes'] / 1e9:.1f} | {s['export_one_task_s']:.2f} |"
                if "adapters_write_s" in s
                else "- | - |"
            )
        )
    (out / "bench_tasks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(summary, configs[1:], out / "bench_tasks.png")


def plot(summary: dict, configs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for prefetch in (True, False):
        series = [c for c in configs if parse_config(c)[1] == prefetch]
        if series:
            left.errorbar(
                [parse_config(c)[0] for c in series],
                [summary[c]["step_s_median"] for c in series],
                yerr=[
                    [summary[c]["step_s_median"] - summary[c]["step_s_min"] for c in series],
                    [summary[c]["step_s_max"] - summary[c]["step_s_median"] for c in series],
                ],
                fmt="o-" if prefetch else "x:",
                capsize=3,
                label="bora_pyro" if prefetch else "bora_pyro, no read-ahead of the next rows",
            )
    rss = [c for c in configs if parse_config(c)[1]]  # the read-ahead changes the time only
    d = [parse_config(c)[0] for c in rss]
    for axis, key in ((left, "step_s_median"), (right, "train_peak_rss_gib")):
        for config in rss:  # which store each D got ("auto": memory-mapped files above 8 GB of tables)
            axis.annotate(
                summary[config]["store"],
                (parse_config(config)[0], summary[config][key]),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, 6),
            )
    left.axhline(summary["peft"]["step_s_median"], color="gray", ls="--", label="single-adapter PEFT")
    left.set_xscale("log")
    left.set_xlabel("tasks D")
    left.set_ylabel("seconds per step")
    left.legend()
    right.plot(d, [summary[c]["train_peak_rss_gib"] for c in rss], "o-", label="peak RSS, training steps")
    right.plot(d, [summary[c]["peak_rss_gib"] for c in rss], "s--", label="with checkpoint and export")
    right.axhline(summary["peft"]["peak_rss_gib"], color="gray", ls="--", label="single-adapter PEFT")
    right.set_xscale("log")
    right.set_xlabel("tasks D")
    right.set_ylabel("GiB")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="10,100,1000,10000")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--task-store", default="auto", choices=STORES)
    parser.add_argument("--adapters-up-to", type=int, default=10000, help="write the adapters file up to this D")
    parser.add_argument("--scratch", default=None, help="folder for the task store and files (default: the temp dir)")
    parser.add_argument("--out", default="experiments/results/bench_tasks")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    main(parser.parse_args())
