"""Fuzz `bora-pyro train` with generated bad corpus files and config files, end to end; tabulate each case.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fuzz_inputs.py [--cases 800] [--configs 600] [--seed 0]

The CSV and JSON-lines files come from the ``hypothesis`` strategies of ``tests/test_fuzz_data.py`` (good
rows damaged in headers, keys, quoting, cell types, encodings and bytes; empty, binary and huge files).
Each one is trained on by the CLI in this process (the tiny random model, ``--steps 1``) inside a sandbox
that is its working directory, HOME, TMPDIR and bora_pyro cache. Every case must end in a run (exit 0) or
one clear error line (its last line on stderr, naming the command). The ``--config`` files come from the
strategy of ``tests/test_fuzz_config.py`` and are trained on a small good corpus, the command line bounding
the time (``--steps 1 --num-particles 1 --posterior-samples 0``). An exception escaping the CLI, or a
traceback in its output, is counted as a traceback, and every file that appears or changes in the sandbox
outside the case's run folder (its data file excepted) is counted as written outside. The lock files that
bora_pyro keeps in its cache (``locks/``, one per folder it writes) are counted on their own line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' strategies and CLI arguments

from bora_pyro.cli import main
from tests.conftest import train_args
from tests.test_fuzz_config import config_files
from tests.test_fuzz_data import FUZZ, corpus_files

LOCKS = Path("cache") / "locks"
WARM_UP = ("task,text\n" + "".join(f"{t},{t} text number {i}\n" for t in "ab" for i in range(6))).encode()


def snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


class Case:
    """One generated file run through the CLI: its exit code (or "traceback") and its output."""

    def __init__(self, sandbox: Path, number: int, kind: str, data: bytes, log_stream: logging.StreamHandler) -> None:
        self.folder = sandbox / "cases" / str(number)
        self.folder.mkdir(parents=True)
        self.data = self.folder / f"corpus.{kind}"
        self.data.write_bytes(data)
        self.run = self.folder / "run"
        self.kind = kind
        self.digest = hashlib.sha256(data).hexdigest()
        before = snapshot(sandbox)
        self.outcome, self.output = self._train(log_stream)
        after = snapshot(sandbox)
        inside = {self.data.relative_to(sandbox), *(p for p in after if self._in_run(sandbox / p))}
        changed = {p for p, stamp in after.items() if before.get(p) != stamp and p not in inside}
        self.locks = {p for p in changed if p.is_relative_to(LOCKS)}
        self.outside = changed - self.locks

    def _in_run(self, path: Path) -> bool:
        return path == self.run or self.run in path.parents

    def _train(self, log_stream: logging.StreamHandler) -> tuple[int | str, str]:
        out = io.StringIO()
        log_stream.setStream(out)
        if self.kind == "config":  # settings from the file, a good corpus, the time bounded
            bounds = ("--config", str(self.data), "--steps", "1", "--num-particles", "1", "--posterior-samples", "0")
            argv = train_args(self.folder.parents[1] / "corpus.csv", self.run, *bounds)
        else:
            argv = train_args(self.data, self.run, "--steps", "1", "--data", f"{self.kind}:{self.data}")
        try:
            with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
                code = main(argv)
        except BaseException as escaped:  # what a user would see as a traceback
            return "traceback", f"{type(escaped).__name__}: {escaped}"
        text = out.getvalue()
        return ("traceback" if "Traceback (most recent call last)" in text else code), text

    @property
    def last_line(self) -> str:
        lines = self.output.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def clear(self) -> bool:
        """A run, or a failure whose last line is the CLI's own (``bora-pyro train: ...``)."""
        return self.outcome == 0 or (self.outcome != "traceback" and self.last_line.startswith("bora-pyro train: "))


def run_cases(sandbox: Path, cases: int, configs: int, rng_seed: int) -> list[Case]:
    """Generate ``cases`` corpus files and ``configs`` config files with the tests' strategies and run each
    through the CLI."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # main()'s basicConfig is then a no-op
    done: list[Case] = []

    @seed(rng_seed)
    @settings(FUZZ, max_examples=cases, phases=[Phase.generate])
    @given(file=corpus_files())
    def one(file: tuple[str, bytes]) -> None:
        case = Case(sandbox, len(done), *file, handler)
        done.append(case)
        if not needs_a_look(case):
            shutil.rmtree(case.folder)  # keep only what needs a look

    @seed(rng_seed)
    @settings(FUZZ, max_examples=configs, phases=[Phase.generate])
    @given(config=config_files())
    def one_config(config: object) -> None:
        case = Case(sandbox, len(done), "config", json.dumps(config).encode(), handler)
        done.append(case)
        if not needs_a_look(case):
            shutil.rmtree(case.folder)

    (sandbox / "corpus.csv").write_bytes(WARM_UP)
    Case(sandbox, -1, "csv", WARM_UP, handler)  # imports and one-time caches (matplotlib's) before counting
    shutil.rmtree(sandbox / "cases")
    if cases:
        one()
    if configs:
        one_config()
    return done


def needs_a_look(case: Case) -> bool:
    return not case.clear or bool(case.outside) or case.outcome == "traceback"


def table(done: list[Case], seconds: float) -> str:
    by_outcome: dict[str, list[Case]] = defaultdict(list)
    for case in done:
        by_outcome[f"exit {case.outcome}" if case.outcome != "traceback" else "traceback"].append(case)
    rows = [
        "| outcome | cases | csv | jsonl | config | most common last line (file paths shortened) |",
        "|---|---|---|---|---|---|",
    ]
    for outcome, cases in sorted(by_outcome.items()):
        kinds = Counter(c.kind for c in cases)
        common = Counter(_shorten(c) for c in cases).most_common(1)[0][0]
        counts = f"{kinds['csv']} | {kinds['jsonl']} | {kinds['config']}"
        rows.append(f"| {outcome} | {len(cases)} | {counts} | `{common}` |")
    summary = [
        (
            "cases (generated CSV / JSON-lines corpus files and config files)",
            f"{len(done)} ({len({(c.kind, c.digest) for c in done})} distinct)",
        ),
        ("tracebacks (must be 0)", sum(c.outcome == "traceback" for c in done)),
        ("failures whose last line is not one clear error line (must be 0)", sum(not c.clear for c in done)),
        ("files written outside the run folder (must be 0)", sum(len(c.outside) for c in done)),
        ("lock files in the bora_pyro cache (locks/, by design)", len({p for c in done for p in c.locks})),
        ("time", f"{seconds:.0f} s ({seconds / max(len(done), 1):.2f} s per case)"),
    ]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in summary)]
    details = [
        f"- case {c.folder} ({c.kind}): {c.outcome}: {c.last_line[:300]}; outside: {sorted(map(str, c.outside))}"
        for c in done
        if needs_a_look(c)
    ]
    return "\n".join([*lines, "", *rows, "", *(details or ["no case needs a look"]), ""])


def _shorten(case: Case) -> str:
    line = case.last_line.replace(str(case.data), "FILE").replace("|", "\\|")
    return line if len(line) <= 160 else line[:157] + "..."


def main_fuzz() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=800, help="generated files (some repeat: 800 gave 668 distinct)")
    parser.add_argument("--configs", type=int, default=600, help="generated --config files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sandbox = Path(tempfile.mkdtemp(prefix="bora-fuzz-")).resolve()
    for name in ("cwd", "home", "tmp", "cache"):
        (sandbox / name).mkdir()
    os.environ.update(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"), BORA_PYRO_CACHE=str(sandbox / "cache"))
    tempfile.tempdir = str(sandbox / "tmp")
    os.chdir(sandbox / "cwd")
    start = time.perf_counter()
    done = run_cases(sandbox, args.cases, args.configs, args.seed)
    command = f"experiments/fuzz_inputs.py --cases {args.cases} --configs {args.configs} --seed {args.seed}"
    print(f"`OMP_NUM_THREADS=1 .venv/bin/python {command}`\n")
    print(table(done, time.perf_counter() - start))
    if any(needs_a_look(c) for c in done):
        print(f"the cases that need a look are kept in {sandbox}")
    else:
        shutil.rmtree(sandbox)


if __name__ == "__main__":
    main_fuzz()
