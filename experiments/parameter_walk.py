"""How often following a run through the code climbs back up the layers (issue 26's "parameter walk").

Traces every call into bora_pyro during one ``train_run`` of the tiny random LLaMA (2 steps, 4 training
documents per book) and counts the consecutive calls whose module lies in a higher layer than the one before
(nn -> data -> io -> models -> evaluation -> inference -> runs -> sweep -> cli, as tests/test_structure.py
orders them): each is a place where a reader following the run must go back up. To measure another checkout's
code, put its folder first on the path:

    .venv/bin/python experiments/parameter_walk.py
    mkdir /tmp/before && git archive REV bora_pyro | tar -x -C /tmp/before
    cd /tmp && PYTHONPATH=/tmp/before /path/to/.venv/bin/python /path/to/experiments/parameter_walk.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

LAYERS = ["version", "options", "distributed", "nn", "data", "io", "models", "evaluation", "inference", "runs"]
LAYERS += ["sweep", "seed_sweep", "cli"]


def layer(module: str) -> int:
    """The layer of a bora_pyro module (the package itself sits on top)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def main(args: argparse.Namespace) -> None:
    import bora_pyro
    from bora_pyro.runs import RunSpec, train_run

    calls: list[str] = []

    def tracer(frame, event, arg):  # sys.settrace's signature
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("bora_pyro") and len(calls) < args.limit:
            calls.append(module)

    spec = RunSpec(model="tiny-random-llama")
    spec = dataclasses.replace(
        spec,
        train=dataclasses.replace(spec.train, steps=2, eval_every=2, progress=False),
        corpus=dataclasses.replace(spec.corpus, max_train_docs=4, max_eval_docs=2),
    )
    with tempfile.TemporaryDirectory() as scratch:
        sys.settrace(tracer)
        try:
            train_run(spec, Path(scratch) / "run")
        finally:
            sys.settrace(None)
    climbs = sum(1 for a, b in zip(calls, calls[1:]) if layer(b) > layer(a))
    print(f"{bora_pyro.__file__}: {len(calls)} calls into bora_pyro, {climbs} climb back up a layer, "
          f"{len(set(calls))} modules visited")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=10_000_000, help="count only the first N calls")
    main(parser.parse_args())
