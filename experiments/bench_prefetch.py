"""Does reading the next step's rows ahead hide the disk? A disk task store's read-ahead, measured alone.

A disk task store at D tasks with SmolLM2-135M's tables (rank 8, q_proj+v_proj: 120 guide tables of rows
[8, 576], [576, 8], [8, 576], [192, 8] and their two AdamW moment tables each, 5.5 MB per task in all) whose
rows for the steps' tasks are on the disk, not in the page cache (written, flushed, then evicted with
``posix_fadvise(DONTNEED)``): the state of a long run whose tables outgrow memory. Each step reads its 8
tasks' rows of every table as a training step does (``guides.take_rows``), after ``--compute`` seconds of
stand-in compute (a sleep: the CPU is not what is measured) during which the store has been told the step's
tasks (``TaskStore.prefetch``, as ``TrainStep`` does with the next step's tasks) or not. Printed: the
seconds a step waits for its rows, median [range] over steps, and the major page faults per step.

    .venv/bin/python experiments/bench_prefetch.py --out experiments/results/bench_prefetch
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bora_pyro.io.task_store import TaskStore
from bora_pyro.models.guides import take_rows

ROWS = {"q_proj.A": (8, 576), "q_proj.B": (576, 8), "v_proj.A": (8, 576), "v_proj.B": (192, 8)}


def make_store(folder: Path, num_tasks: int, layers: int) -> TaskStore:
    store = TaskStore("disk", folder)
    for layer in range(layers):
        for name, shape in ROWS.items():
            for table in ("guide", "adamw.exp_avg", "adamw.exp_avg_sq"):
                store.table(f"{table}.layers.{layer}.{name}", (num_tasks, *shape))
    return store


def evict(store: TaskStore) -> None:
    """Write the tables out and drop their pages from the page cache (a cold cache, without root)."""
    store.flush()
    store.release()
    for name in store.tables:
        fd = os.open(store.path(name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(store: TaskStore, steps: list[torch.Tensor], compute: float, prefetch: bool) -> tuple[list[float], float]:
    """Per step: (read-ahead of the step's rows), stand-in compute, then the rows read. Returns the read times
    and the major page faults per step."""
    waits, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for rows in steps:
        if prefetch:
            store.prefetch(rows)
        time.sleep(compute)
        start = time.perf_counter()
        total = sum(float(take_rows(table, rows).sum()) for table in store.tables.values())
        waits.append(time.perf_counter() - start)
        assert total == total  # the rows were read (not optimised away)
        store.release()
    return waits, (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults) / len(steps)


def main(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-prefetch-", dir=args.scratch))
    store = make_store(folder / "store", args.tasks, args.layers)
    draws = {
        variant: [torch.randperm(args.tasks, generator=generator)[:8].sort().values for _ in range(args.steps)]
        for variant in ("prefetch", "none")
    }
    with torch.no_grad():  # the drawn tasks' rows hold data on the disk (the other rows are never read)
        for steps in draws.values():
            for rows in steps:
                for table in store.tables.values():
                    table[rows] = torch.randn(len(rows), *table.shape[1:], generator=generator)
    lines = [
        f"# Reading a step's rows from a cold disk task store ({args.tasks} tasks, {args.layers} layers x 4 tables "
        f"x 3 (rows and moments) = {len(store.tables)} tables, 8 tasks per step, {args.compute} s of stand-in "
        f"compute before the read; {args.steps} steps each, alternating)",
        "",
        "| read-ahead | seconds waiting for the rows per step, median [range] | major page faults per step |",
        "|---|---|---|",
    ]
    results = {}
    for repeat in range(args.repeats):  # A B A B: the disk's speed drifts
        for variant, steps in draws.items():
            evict(store)
            waits, faults = run(store, steps, args.compute, variant == "prefetch")
            results.setdefault(variant, ([], []))[0].extend(waits)
            results[variant][1].append(faults)
            print(f"repeat {repeat} {variant}: median {statistics.median(waits):.3f} s, {faults:.0f} faults")
    for variant, (waits, faults) in results.items():
        lines.append(
            f"| {'yes (TaskStore.prefetch)' if variant == 'prefetch' else 'no'} | {statistics.median(waits):.3f} "
            f"[{min(waits):.3f}, {max(waits):.3f}] | {statistics.median(faults):.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prefetch.md").write_text(text)
    store.close()
    shutil.rmtree(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compute", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scratch", default=None, help="folder for the store's files (default: the temp dir)")
    parser.add_argument("--out", default="experiments/results/bench_prefetch")
    main(parser.parse_args())
