"""Kill a training run (SIGKILL) at random moments, resume it, and check it ends as an uninterrupted run.

Half of the kills land at a random time, the others at a random named crash point inside our writes
(``bora_pyro.io.faults``: inside a checkpoint save, between renaming a folder aside and the new one in,
after the fitted state is written, inside a single file's replacement...). Every killed run is then
continued as a user would: ``bora-pyro train --resume RUN``, or, when nothing was saved yet, the same
command again. A quarter of the attempts replace an earlier, different run (another seed) with
``--overwrite``. The final run folder must equal the uninterrupted run's (adapters to 1e-6, the same train_log.csv).

The other writing verbs get the same treatment (``--verb-attempts``): ``export`` (a first export and the
replacement of an earlier one), ``evaluate`` completing a run whose scoring never finished, and ``adapt``,
each killed at a crash point inside its writes, checked right after the kill (the target is absent, or the
old or the new folder, complete: every file matches its manifest), then run again and compared with an
uninterrupted run of the same command.

    .venv/bin/python experiments/fault_injection.py --attempts 40 --verb-attempts 30 \\
        > experiments/results/fault_injection.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bora_pyro.io.faults import CRASH_ENV
from bora_pyro.io.folders import folder_kind
from bora_pyro.io.integrity import read_manifest, verify
from bora_pyro.runs.run_files import verified_status
from tests.conftest import synthetic_rows, train_args

# crash points and how many times a run reaches each (k is drawn from 1..count)
CRASH_POINTS = {
    "checkpoint.tensors-written": 6,
    "checkpoint.slot-written": 6,
    "checkpoint.slot-renamed": 6,
    "folder.written": 2,
    "folder.renamed-aside": 1,
    "folder.renamed-in": 2,
    "file.written": 14,
    "run.fitted": 1,
}


def command(data: Path, out: Path, overwrite: bool) -> list[str]:
    options = [
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--eval-every",
        "8",
        "--checkpoint-every",
        "4",
        "--lr",
        "0.01",
        "--posterior-samples",
        "2",
        *(["--overwrite"] if overwrite else []),
    ]
    return [sys.executable, "-m", "bora_pyro.cli", *train_args(data, out, *options)]


def run(args: list[str], crash: str | None = None, kill_after: float | None = None, started: Path | None = None) -> int:
    """Run a CLI command; kill it at crash point ``crash``, or ``kill_after`` seconds after the folder
    ``started`` appears (the training has begun)."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash:
        env[CRASH_ENV] = crash
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        while started is not None and not started.exists() and proc.poll() is None:
            time.sleep(0.01)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
    err = proc.communicate()[1]
    if proc.returncode not in (0, -9):
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode


def same_run(run: Path, reference: Path) -> bool:
    a, b = load_file(run / "adapters.safetensors"), load_file(reference / "adapters.safetensors")
    close = a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)
    return close and (run / "train_log.csv").read_text() == (reference / "train_log.csv").read_text()


VERB_POINTS = {  # crash points each verb reaches, with how many times
    "export": {"folder.written": 1, "folder.renamed-aside": 1, "folder.renamed-in": 1, "file.written": 6},
    "evaluate": {"file.written": 8},
    "adapt": {"folder.written": 1, "folder.renamed-in": 1, "file.written": 8, "run.fitted": 1},
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bora_pyro.cli", *args]


def intact(folder: Path) -> str:
    """ "absent", or "complete" when every file matches the folder's manifest (else what is wrong)."""
    if not folder.exists():
        return "absent"
    try:
        if folder_kind(folder) == "run":  # the run-level check: a run being scored is checked on its stage-1 files
            return f"intact, {verified_status(folder)['status']}"
        return "complete" if verify(folder) is not None else "no manifest"
    except ValueError as err:
        return f"DAMAGED: {err}"


def same_export(a: Path, b: Path) -> bool:
    """Two export folders hold the same files with the same bytes (digests from their manifests)."""
    return read_manifest(a)["files"] == read_manifest(b)["files"]


def verb_commands(work: Path, data: Path, source: Path, verb: str, out: Path) -> list[str]:
    if verb == "export":
        return cli("export", str(source), "--out", str(out), "--overwrite")
    if verb == "adapt":
        return cli(
            "adapt",
            str(source),
            "--data",
            f"csv:{data}",
            "--out",
            str(out),
            "--steps",
            "6",
            "--no-progress",
            "--overwrite",
        )
    return cli("evaluate", str(out))


def verb_attempts(args: argparse.Namespace, work: Path, data: Path, source: Path, rng: random.Random) -> list[tuple]:
    """Kill export / evaluate / adapt at their crash points, check the target, rerun, compare."""
    references = {}
    for verb in VERB_POINTS:
        out = work / f"ref-{verb}"
        if verb == "evaluate":  # a run whose scoring never finished: killed right after its fitted state
            run(command(data, out, False), crash="run.fitted:1")
            shutil.copytree(out, work / "trained")
        run(verb_commands(work, data, source, verb, out))
        references[verb] = out
    rows = []
    for attempt in range(args.verb_attempts):
        verb = list(VERB_POINTS)[attempt % len(VERB_POINTS)]
        point = rng.choice(sorted(VERB_POINTS[verb]))
        crash = f"{point}:{rng.randint(1, VERB_POINTS[verb][point])}"
        out = work / f"{verb}{attempt}"
        replacing = verb == "export" and attempt % 2 == 1
        if verb == "evaluate":
            shutil.copytree(work / "trained", out)
        elif replacing:
            shutil.copytree(references["export"], out)
            crash = crash.replace("folder.renamed-aside", "folder.renamed-aside")
        elif point == "folder.renamed-aside":
            crash = "folder.renamed-in:1"
        code = run(verb_commands(work, data, source, verb, out), crash=crash)
        after_kill = intact(out) if code != 0 else "finished"
        run(verb_commands(work, data, source, verb, out))
        if verb == "export":
            equal = same_export(out, references["export"])
        else:
            scores = [json.loads((f / "metrics.json").read_text()).get("test_ppl") for f in (out, references[verb])]
            equal = same_run(out, references[verb]) and intact(out) == "intact, complete" and scores[0] == scores[1]
        rows.append((verb, crash, "yes" if replacing else "no", after_kill, "yes" if equal else "NO"))
    return rows


def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bora-faults-"))
    data = work / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    reference = work / "reference"
    started = time.perf_counter()
    run(command(data, reference, False))
    duration = time.perf_counter() - started
    earlier = work / "earlier"  # a different run (another seed) for the --overwrite attempts to replace
    run(command(data, earlier, False) + ["--seed", "1"])
    counts: collections.Counter = collections.Counter()
    rows = []
    for attempt in range(args.attempts):
        out = work / f"run{attempt}"
        overwrite = attempt % 4 == 3
        if overwrite:
            shutil.copytree(earlier, out)
        if attempt % 2 == 0:  # renaming aside happens only when an earlier run is replaced
            point = rng.choice([p for p in sorted(CRASH_POINTS) if overwrite or p != "folder.renamed-aside"])
            crash, how = f"{point}:{rng.randint(1, CRASH_POINTS[point])}", None
            code = run(command(data, out, overwrite), crash=crash)
            how = f"crash point {crash}"
        else:
            delay = rng.uniform(0.0, args.training_seconds)
            code = run(command(data, out, overwrite), kill_after=delay, started=out.parent / f"{out.name}.checkpoint")
            how = f"{delay:.2f} s into training"
        if code == 0:
            outcome = "finished before the kill"
        else:
            resumed = subprocess.run(
                [sys.executable, "-m", "bora_pyro.cli", "train", "--resume", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if resumed.returncode == 0 and "nothing to resume" not in resumed.stderr:
                outcome = "resumed (--resume)"
            elif "already complete" in resumed.stderr and not overwrite:
                outcome = "complete when the kill landed (process exiting): nothing to resume"
            elif "nothing to resume" in resumed.stderr:  # no checkpoint yet (the earlier run may still be in place)
                run(command(data, out, True))
                outcome = "nothing saved yet: the command rerun"
            else:
                outcome = f"NOT RESUMABLE: {resumed.stderr.strip().splitlines()[-1]}"
        equal = (out / "status.json").is_file() and same_run(out, reference)
        counts[outcome] += 1
        counts["equal to the uninterrupted run" if equal else "DIFFERENT from the uninterrupted run"] += 1
        rows.append((attempt, "yes" if overwrite else "no", how, outcome, "yes" if equal else "NO"))
    verb_rows = verb_attempts(args, work, data, reference, rng) if args.verb_attempts else []
    killed = args.attempts - counts["finished before the kill"]
    print(
        f"# Fault injection: {args.attempts} attempts, {killed} runs killed "
        "(tiny model, 24 steps, checkpoint every 4)\n"
    )
    print(
        f"Command: `.venv/bin/python experiments/fault_injection.py --attempts {args.attempts} --seed {args.seed}`; "
        f"uninterrupted run {duration:.1f} s.\n"
    )
    print("| outcome | runs |\n|---|---|")
    for outcome, n in sorted(counts.items()):
        print(f"| {outcome} | {n} |")
    print("\n| attempt | --overwrite of an earlier run | killed | recovery | equal (adapters 1e-6, train log) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    if verb_rows:
        damaged = sum(not r[3].startswith(("absent", "complete", "intact", "finished")) for r in verb_rows)
        equal = sum(r[4] == "yes" for r in verb_rows)
        print(
            f"\n## export, evaluate and adapt: {len(verb_rows)} kills, {damaged} left a damaged target, "
            f"{equal} of {len(verb_rows)} equal to the uninterrupted command after a rerun\n"
        )
        print("| verb | killed at | replacing an earlier export | target right after the kill | equal after a rerun |")
        print("|---|---|---|---|---|")
        for row in verb_rows:
            print("| " + " | ".join(str(v) for v in row) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verb-attempts", type=int, default=30, help="kills of export, evaluate and adapt")
    parser.add_argument(
        "--training-seconds",
        type=float,
        default=1.5,
        help="timed kills land uniformly in this many seconds after training starts",
    )
    main(parser.parse_args())
