"""Red-team harness for issue 22: every class of defect it names, and variants of each, tried as a user would.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/red_team.py > experiments/results/red_team.md

Every case runs ``bora_pyro.cli.main(argv)`` in this process (through ``bad_inputs.run``), or the CLI in a
subprocess where it needs concurrency (item 2), a kill at a crash point of ``bora_pyro/io/faults.py``
(items 3, 5, 8), a signal, or a peak-memory measurement (item 11). Each case has its own scratch folder,
its working directory and ``$HOME``, holding ``data.csv`` and copies (``shutil.copytree``) of the victim
folders built once at the start: a complete run, a run with a posterior, a run marked trained with its
checkpoint, a checkpoint with two slots, a sweep, a PEFT export, a merged model, and replacements killed
after renaming the old run aside and after renaming the new one in.

A case is as expected when its exit code is one it allows; an error is one line ``bora-pyro VERB: error:
...`` naming what it must; no exception escapes ``main`` and no traceback is printed; every entry of the
scratch folder that the case may not change (victims, user files added inside them) is byte-identical
afterwards (SHA-256 of every file, every link's target); and nothing was written outside the scratch folder.
The lock files go where ``$BORA_PYRO_CACHE`` says (a folder of the harness's own). The table goes to
stdout, progress to stderr; the exit status is 1 if any case is not as expected. ``--only 1.,9.4`` runs the
cases whose id starts so (the victims are built either way).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bad_inputs  # noqa: E402  (experiments/ is on sys.path when run as a script)
from bad_inputs import run  # noqa: E402

from bora_pyro import cli  # noqa: E402
from bora_pyro.io.faults import CRASH_ENV  # noqa: E402
from tests.conftest import synthetic_rows  # noqa: E402

PY = sys.executable
VERBS = ("train", "sweep", "adapt", "evaluate", "export", "generate", "diagnose")
T_ARGS = [
    "--model",
    "tiny-random-llama",
    "--data",
    "csv:data.csv",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--no-progress",
    "--posterior-samples",
    "0",
]
PLACES = {  # placeholder -> the victim's name in a case's scratch folder (its working directory)
    "TRAINED": "trained",
    "TWOSLOT": "twoslot",
    "SWEEP": "sweep",
    "EXPORT": "export",
    "MERGED": "merged",
    "RUNP": "runp",
    "RUN": "run",
    "CSV": "data.csv",
    "HOME": "home",
}
ERROR_CODES = (2, 3, 4, 75)
ERROR_LINE = re.compile(r"bora-pyro( [\w-]+)?: (system )?error: ")  # exit 3's says "system error"
TASKS = {"a": 12, "b": 8, "c": 5}  # the victims' corpus
RSS_LIMIT_MB = 5000  # a subprocess above this is killed (the machine is shared)
RSS_MARGIN_MB = 400  # item 11: peak memory allowed above a tiny run's
TWICE = "duplicate|twice|more than once|repeated"  # what a line about a name given twice says
GEN = ["--task", "a", "--prompt", "hi", "--max-new-tokens", "2"]
ROOT = TEMPLATES = CASES = CACHE = HARNESS = Path()  # set by init_layout()
SETUP: dict[str, str] = {}  # victim -> why it could not be built
BASELINE: dict[str, float] = {}  # "rss_mb": peak RSS of a tiny training run in a subprocess


# --------------------------------------------------------------------------------------------- results


@dataclass
class Res:
    """What one command gave: exit code (or "traceback"), the line shown, the whole stderr and stdout."""

    code: int | str
    line: str
    stderr: str = ""
    stdout: str = ""
    traceback: str | None = None


@dataclass
class Observed:
    """What a case observed (its commands' exit codes, the line shown) and its failed checks."""

    code: str
    line: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Scratch:
    """A case's scratch folder and what must be undone after it (processes to kill, mounts to undo)."""

    path: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=30)
        for mount in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@dataclass
class Case:
    """One red-team case: ``fn`` runs it in its scratch folder (after ``prepare``); every pre-existing entry
    of the scratch folder but ``may_change`` (and the sub-paths ``guard_extra`` in any case) is guarded."""

    id: str
    item: int
    command: str
    expected: str
    fn: Callable[[Scratch], Observed]
    victims: tuple[str, ...] = ()
    prepare: Callable[[Scratch], None] | None = None
    may_change: tuple[str, ...] = ()
    guard_extra: tuple[str, ...] = ()
    guard_only: tuple[str, ...] | None = None  # guard these entries only (the case's own checks say the rest)


@dataclass
class Row:
    """A case's line in the table."""

    case: Case
    observed: Observed
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------ invocation

_calls: dict = {}


def _text(stream: object) -> str:
    getvalue = getattr(stream, "getvalue", None)
    return getvalue() if callable(getvalue) else ""


def _recording_main(argv: list[str]) -> int:
    """``cli.main``, recording the whole stderr / stdout that ``bad_inputs.run`` captures, and what escaped."""
    err, out = sys.stderr, sys.stdout
    try:
        code = cli.main(argv)
    except SystemExit:
        _calls.update(err=_text(err), out=_text(out))
        raise
    except BaseException as escaped:
        _calls.update(err=_text(err), out=_text(out), tb=f"{type(escaped).__name__}: {escaped}")
        raise
    _calls.update(code=code, err=_text(err), out=_text(out))
    return code


bad_inputs.main = _recording_main  # bad_inputs.run calls the CLI through this name


def invoke(argv: list[str]) -> Res:
    """Run the CLI in this process through ``bad_inputs.run``."""
    _calls.clear()
    try:
        code, line = run(argv)
    except IndexError:  # the helper finds no line when nothing at all was printed
        code, line = _calls.get("code", "?"), "(nothing printed)"
    tb = _calls.get("tb")
    if tb is None and "Traceback (most recent call last)" in _calls.get("err", ""):
        tb = "printed: " + _calls["err"].strip().splitlines()[-1]
    return Res(code, line.replace("\\|", "|"), _calls.get("err", ""), _calls.get("out", ""), tb)


def expand(tokens: Sequence[str]) -> list[str]:
    """A command template's arguments: ``{T}`` -> the tiny training options, ``{RUN}`` -> ``run``..."""
    out: list[str] = []
    for token in tokens:
        if token == "{T}":
            out += T_ARGS
            continue
        for key, value in PLACES.items():
            token = token.replace("{" + key + "}", value)
        out.append(token)
    return out


def show(tokens: Sequence[str]) -> str:
    """A command template as the table shows it: ``bora-pyro export RUN --out RUN --overwrite``."""
    parts = []
    for token in tokens:
        if token == "{T}":
            parts.append("$T")
            continue
        for key in PLACES:
            token = token.replace("{" + key + "}", key)
        parts.append(shlex.quote(token))
    return "bora-pyro " + " ".join(parts)


def subprocess_env(extra: dict[str, str] | None = None, crash: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", BORA_PYRO_CACHE=str(CACHE), **(extra or {}))
    if crash:
        env[CRASH_ENV] = crash
    return env


def spawn(argv: list[str], cwd: Path, crash: str | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start the CLI in a subprocess (``prefix``: other interpreter arguments than ``-m bora_pyro.cli``)."""
    command = [PY, *(prefix or ["-m", "bora_pyro.cli"]), *argv]
    env = subprocess_env({"HOME": str(HARNESS / "home")}, crash)  # libraries' caches (matplotlib...) go there
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    )


def exit_code(returncode: int) -> int:
    """A subprocess's exit status as a shell shows it (killed by signal N: 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def finish(proc: subprocess.Popen, timeout: float = 240) -> Res:
    """Wait for a CLI subprocess and return what it gave."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return Res("timeout", f"still running after {timeout:.0f} s (killed)", err, out)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    tb = None
    if "Traceback (most recent call last)" in err:
        tb = lines[-1] if lines else "Traceback"
    return Res(exit_code(proc.returncode), lines[-1] if lines else "(nothing on stderr)", err, out, tb)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen | None, timeout: float) -> bool:
    """Poll until ``predicate`` holds (True), ``proc`` ends or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    return False


HOLD_FILE = (
    "import sys, time, filelock\n"
    "lock = filelock.FileLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"
)
HOLD_TOOL = (
    "import sys, time\nfrom bora_pyro.io.folders import folder_lock\n"
    "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
)


@contextlib.contextmanager
def lock_held(s: Scratch, folder: str) -> Iterator[None]:
    """Another process holds the lock of ``folder`` (in the scratch folder) for the block."""
    target = (s / folder).resolve()
    try:
        from bora_pyro.io.folders import _lock_of

        command = [PY, "-c", HOLD_FILE, str(_lock_of(target).lock_file)]
    except Exception:  # the locking changed: let the tool's own code take it (slower)
        command = [PY, "-c", HOLD_TOOL, str(target)]
    proc = subprocess.Popen(command, cwd=s.path, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    s.procs.append(proc)
    if proc.stdout is None or proc.stdout.readline().strip() != "held":
        raise RuntimeError(f"the lock holder of {folder} did not start")
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


RSS_WRAPPER = (
    "import os, resource, sys\nfrom bora_pyro.cli import main\ncode = main(sys.argv[1:])\n"
    "open(os.environ['RT_RSS'], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measured(argv: list[str], cwd: Path, timeout: float = 240) -> tuple[Res, float | None, float, str | None]:
    """Run the CLI in a subprocess that reports its peak RSS (``resource.getrusage``), killed above
    :data:`RSS_LIMIT_MB` or after ``timeout`` s. Returns (result, peak MB, seconds, why it was killed)."""
    rss_file = HARNESS / f"rss-{os.getpid()}-{time.monotonic_ns()}"
    with open(HARNESS / "measured.stderr", "w") as stderr:
        proc = subprocess.Popen(
            [PY, "-c", RSS_WRAPPER, *argv],
            cwd=cwd,
            env=subprocess_env({"HOME": str(HARNESS / "home"), "RT_RSS": str(rss_file)}),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        started, killed, seen = time.monotonic(), None, 0.0
        while proc.poll() is None:
            seen = max(seen, _rss_mb(proc.pid))
            if seen > RSS_LIMIT_MB:
                killed = f"killed by the harness at {seen:.0f} MB RSS"
            elif time.monotonic() - started > timeout:
                killed = f"killed by the harness after {timeout:.0f} s"
            if killed:
                proc.kill()
                break
            time.sleep(0.05)
        proc.wait()
    seconds = time.monotonic() - started
    err = (HARNESS / "measured.stderr").read_text(errors="replace")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    tb = (lines[-1] if lines else "Traceback") if "Traceback (most recent call last)" in err else None
    res = Res(exit_code(proc.returncode), lines[-1] if lines else "(nothing on stderr)", err, "", tb)
    peak = int(rss_file.read_text()) / 1024 if rss_file.is_file() else (seen or None)
    rss_file.unlink(missing_ok=True)
    return res, peak, seconds, killed


# ------------------------------------------------------------------------------------------- checking


def _matches(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text, re.IGNORECASE) is not None
    except re.error:
        return pattern.lower() in text.lower()


def check(res: Res, codes: Sequence[int], mention: Sequence[str] = (), say: Sequence[str] = ()) -> list[str]:
    """Problems of one command's result: another exit code, an error that is not one clear line naming
    each of ``mention``, output that does not say each of ``say``, a traceback."""
    problems = []
    if res.traceback:
        problems.append(f"traceback ({res.traceback[:200]})")
    if res.code not in codes:
        problems.append(f"exit {res.code}, expected {' or '.join(map(str, codes))}")
    if res.code in ERROR_CODES:
        if not ERROR_LINE.search(res.line):
            problems.append("the last line is not 'bora-pyro VERB: error: ...'")
        errors = [line for line in res.stderr.splitlines() if ERROR_LINE.search(line)]
        if len(errors) > 1:
            problems.append(f"{len(errors)} error lines")
        if len(res.line) > 600:
            problems.append(f"the error line is {len(res.line)} characters long (a dump?)")
        missing = [m for m in mention if not _matches(m, res.line)]
        if missing:
            problems.append(f"the line does not name {', '.join(missing)}")
    unsaid = [s for s in say if not _matches(s, res.stderr + "\n" + res.stdout)]
    if unsaid:
        problems.append(f"the output does not say {', '.join(unsaid)}")
    return problems


def expected_text(codes: Sequence[int], mention: Sequence[str] = (), say: Sequence[str] = (), note: str = "") -> str:
    text = "exit " + " or ".join(map(str, codes))
    if mention:
        text += "; the line names " + ", ".join(f"`{m}`" for m in mention)
    if say:
        text += "; says " + ", ".join(f"`{s}`" for s in say)
    return text + (f"; {note}" if note else "")


def steps_observed(steps: list[tuple[str, Res]], problems: list[str]) -> Observed:
    """A multi-command case's observation: every command's exit code, and the line of the first command
    that failed a check (else of the last)."""
    code = ", ".join(f"{label} {res.code}" for label, res in steps)
    failing = [res for label, res in steps if any(p.startswith(label + ":") for p in problems)]
    line = (failing or [res for _, res in steps] or [Res("", "")])[0 if failing else -1].line
    return Observed(code, line, problems)


def _sha(path: Path) -> str:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    except OSError as err:
        return f"unreadable ({err.strerror})"


def tree_digest(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (``.`` itself): a file's SHA-256, a link's target, "dir"; {} if absent."""
    if not os.path.lexists(path):
        return {}
    if path.is_symlink():
        return {".": "link:" + os.readlink(path)}
    if not path.is_dir():
        return {".": _sha(path)}
    out = {".": "dir"}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(root) / name
            rel = str(entry.relative_to(path))
            if entry.is_symlink():
                out[rel] = "link:" + os.readlink(entry)
            elif entry.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _sha(entry)
    return out


def digest_changes(name: str, before: dict[str, str], after: dict[str, str]) -> str | None:
    """How a guarded entry changed ("RUN lost", "RUN: changed config.json..."), or None."""
    if before == after:
        return None
    if not after:
        return f"{name} was deleted"
    if not before:
        return f"{name} appeared"
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    added = sorted(set(after) - set(before))
    parts = [
        f"{label} {', '.join(names[:3])}{'...' if len(names) > 3 else ''}"
        for label, names in (("lost", lost), ("changed", changed), ("added", added))
        if names
    ]
    return f"{name}: " + "; ".join(parts)


TOOL_NAMES = (".*.tmp-*", ".*.old-*", ".bora_pyro.json", "manifest.json", "sweep.json", "tau_sweep.csv")


def outside_snapshot(scratch: Path) -> dict[str, tuple]:
    """What lies outside the case's scratch folder that a case could write: the harness's folder (but the
    scratch folder, the lock cache and the harness's own files), new entries of /, and tool-made names in
    /tmp and the repository."""
    snap: dict[str, tuple] = {}
    skip = {scratch, CACHE, HARNESS}
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if Path(root) / d not in skip]
        for name in dirs + files:
            entry = Path(root) / name
            with contextlib.suppress(OSError):
                st = entry.lstat()
                snap[str(entry)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    for folder, every in ((Path("/"), True), (Path(tempfile.gettempdir()), False), (REPO, False)):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if every or any(fnmatch.fnmatchcase(name, p) for p in TOOL_NAMES):
                    snap[str(folder / name)] = ("entry",)
    return snap


def outside_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed:
        return []
    return [f"written outside the scratch folder: {', '.join(changed[:3])}{'...' if len(changed) > 3 else ''}"]


# ------------------------------------------------------------------------------------- damaging files


def flip_bit(path: Path) -> None:
    """Flip one bit in the middle of a file (of a safetensors file: of its tensor data)."""
    data = bytearray(path.read_bytes())
    start = safetensors_start(path) if path.suffix == ".safetensors" else 0
    data[start + (len(data) - start) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def safetensors_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def set_first_float(path: Path, value: float) -> None:
    """Write ``value`` into the first element of the first float32 tensor of a safetensors file, a task
    tensor if there is one (its first row is task a's); the header stays valid."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    for name, meta in sorted(header.items(), key=lambda kv: (not kv[0].startswith("task."), kv[0])):
        if name != "__metadata__" and meta.get("dtype") == "F32" and meta["data_offsets"][1] > meta["data_offsets"][0]:
            offset = 8 + length + meta["data_offsets"][0]
            break
    else:
        raise ValueError(f"{path} holds no float32 tensor")
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


def set_json(path: Path, keys: Sequence[str], value: object) -> None:
    """Set ``value`` at ``keys`` of a JSON file (NaN is written as ``NaN``, as Python's json does)."""
    doc = json.loads(path.read_text())
    node = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(doc, indent=2))


def reseal(folder: Path) -> None:
    """Rewrite a folder's manifest to match its files (what a user who 'fixes' the digests would do)."""
    from bora_pyro.io.integrity import read_manifest, write_manifest

    try:
        unhashed = (read_manifest(folder) or {}).get("unhashed", [])
    except ValueError:  # a damaged manifest: rewritten from scratch
        unhashed = []
    write_manifest(folder, unhashed=unhashed)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "NaN": lambda p: set_first_float(p, float("nan")) if p.suffix == ".safetensors" else _json_number(p, float("nan")),
    "1e30": lambda p: set_first_float(p, 1e30) if p.suffix == ".safetensors" else _json_number(p, 1e30),
    "a flipped bit": flip_bit,
    "truncated": truncate,
}


def _json_number(path: Path, value: float) -> None:
    keys = ("adapter", "alpha") if path.name == "config.json" else ("test_ppl",)
    set_json(path, keys, value)


def newest_slot(checkpoint: Path, index: int = 0) -> Path:
    """The ``index``-th newest slot ``step-*`` of a checkpoint folder."""
    slots = sorted(checkpoint.glob("step-*"), key=lambda p: (int(p.name.split("-")[1]), p.name), reverse=True)
    return slots[index]


def leftovers(folder: Path) -> list[str]:
    """Temporary or renamed-aside copies (``.NAME.tmp-*``, ``.NAME.old-*``) anywhere under ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if fnmatch.fnmatchcase(name, ".*.tmp-*") or fnmatch.fnmatchcase(name, ".*.old-*"):
                found.append(str((Path(root) / name).relative_to(folder)))
    return found


# ---------------------------------------------------------------------------------------- the victims


def init_layout() -> None:
    global ROOT, TEMPLATES, CASES, CACHE, HARNESS
    ROOT = Path(tempfile.mkdtemp(prefix="bora-red-team-")).resolve()
    TEMPLATES, CASES, CACHE, HARNESS = ROOT / "templates", ROOT / "cases", ROOT / "cache", ROOT / "harness"
    for folder in (TEMPLATES, CASES, CACHE, HARNESS, TEMPLATES / "home", HARNESS / "home"):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["BORA_PYRO_CACHE"] = str(CACHE)  # the lock files: never in the real home
    os.environ.pop(CRASH_ENV, None)


@contextlib.contextmanager
def inside(folder: Path, home: Path | None = None) -> Iterator[None]:
    """Work in ``folder`` (the working directory) with ``$HOME`` = ``home`` (default ``folder/home``)."""
    cwd, old_home = os.getcwd(), os.environ.get("HOME")
    os.chdir(folder)
    os.environ["HOME"] = str(home or folder / "home")
    try:
        yield
    finally:
        os.chdir(cwd if Path(cwd).is_dir() else ROOT)
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build(name: str, argv: list[str], codes: Sequence[int] = (0,)) -> None:
    res = invoke(expand(argv))
    if res.code not in codes or res.traceback:
        SETUP[name] = f"{show(argv)} gave exit {res.code}: {res.line}"


def _killed_copy(name: str, crash: str, out: str = "runp") -> subprocess.Popen:
    """Start a ``train --overwrite`` of a copy of RUNP (another seed) in TEMPLATES/name, killed at ``crash``."""
    folder = TEMPLATES / name
    folder.mkdir()
    shutil.copy(TEMPLATES / "data.csv", folder / "data.csv")
    (folder / "home").mkdir()
    if (TEMPLATES / "runp").is_dir():
        shutil.copytree(TEMPLATES / "runp", folder / out, symlinks=True)
    argv = expand(["train", "{T}", "--posterior-samples", "2", "--seed", "1", "--out", out, "--overwrite"])
    return spawn(argv, folder, crash=crash)


def build_victims() -> None:
    """Build every victim folder once in TEMPLATES (cwd there, so that their corpus is ``csv:data.csv``)."""
    synthetic_rows(TASKS).to_csv(TEMPLATES / "data.csv", index=False)
    with inside(TEMPLATES):
        _build("run", ["train", "{T}", "--out", "{RUN}"])
        _build("runp", ["train", "{T}", "--posterior-samples", "2", "--out", "{RUNP}"])
        _build("sweep", ["sweep", "{T}", "--taus", "1", "--out", "{SWEEP}"])
        _build("export", ["export", "{RUN}", "--out", "{EXPORT}"])
        _build("merged", ["export", "{RUN}", "--format", "merged", "--task", "a", "--out", "{MERGED}"])
    procs = {
        "trained": spawn(
            expand(["train", "{T}", "--checkpoint-every", "1", "--out", "{TRAINED}"]), TEMPLATES, "run.fitted:1"
        ),
        "twoslot": spawn(
            expand(["train", "{T}", "--steps", "4", "--checkpoint-every", "1", "--out", "{TWOSLOT}"]),
            TEMPLATES,
            "checkpoint.slot-renamed:2",
        ),
        "killed": _killed_copy("killed", "folder.renamed-aside:1"),
        "killed_in": _killed_copy("killed_in", "folder.renamed-in:1"),
    }
    (TEMPLATES / "baseline").mkdir()
    shutil.copy(TEMPLATES / "data.csv", TEMPLATES / "baseline" / "data.csv")
    _, peak, _, _ = measured(expand(["train", "{T}", "--out", "r"]), TEMPLATES / "baseline")
    BASELINE["rss_mb"] = peak or 0.0
    for name, proc in procs.items():
        res = finish(proc)
        if res.code != 137:
            SETUP[name] = f"the kill at its crash point did not happen (exit {res.code}: {res.line})"
    _check_victims()


def _check_victims() -> None:
    """Say which victims are not what the cases expect (their cases then fail, naming this)."""
    t = TEMPLATES
    wanted = {
        "trained": (t / "trained" / "fit_state.safetensors").is_file() and (t / "trained.checkpoint").is_dir(),
        "twoslot": len(list((t / "twoslot.checkpoint").glob("step-*"))) >= 2,
        "killed": not (t / "killed" / "runp").exists() and bool(list((t / "killed").glob(".runp.old-*"))),
        "killed_in": (t / "killed_in" / "runp").is_dir() and bool(list((t / "killed_in").glob(".runp.old-*"))),
    }
    for name, ok in wanted.items():
        if not ok:
            SETUP.setdefault(name, f"the {name} victim is not in the expected state after its kill")
    for name in ("run", "runp", "sweep", "export", "merged"):
        if not (t / name).is_dir():
            SETUP.setdefault(name, "not built")


def stage(scratch: Path, victims: Sequence[str]) -> list[str]:
    """Copy the victims into a scratch folder; the problems of those that could not be built."""
    problems = []
    for victim in victims:
        if victim in ("killed", "killed_in"):
            for entry in (TEMPLATES / victim).iterdir():
                if entry.name not in ("data.csv", "home"):
                    shutil.copytree(entry, scratch / entry.name, symlinks=True)
        else:
            for name in (victim, f"{victim}.checkpoint"):
                if (TEMPLATES / name).is_dir():
                    shutil.copytree(TEMPLATES / name, scratch / name, symlinks=True)
        if victim in SETUP:
            problems.append(f"victim {victim} could not be built: {SETUP[victim]}")
    return problems


# ------------------------------------------------------------------------------------------ the runner


def execute(case: Case) -> Row:
    """Run one case in a fresh scratch folder; check what it must not have changed or written."""
    started = time.perf_counter()
    s = Scratch(CASES / case.id)
    s.path.mkdir(parents=True)
    shutil.copy(TEMPLATES / "data.csv", s / "data.csv")
    (s / "home").mkdir()
    problems = stage(s.path, case.victims)
    try:
        with inside(s.path):
            if case.prepare is not None:
                case.prepare(s)
        guarded = [e.name for e in s.path.iterdir() if e.name not in case.may_change] + list(case.guard_extra)
        if case.guard_only is not None:
            guarded = list(case.guard_only)
        before = {rel: tree_digest(s / rel) for rel in guarded}
        outside = outside_snapshot(s.path)
        with inside(s.path):
            observed = case.fn(s)
        s.cleanup()
        for rel in guarded:
            change = digest_changes(rel, before[rel], tree_digest(s / rel))
            if change:
                problems.append("guarded entry changed: " + change)
        problems += outside_changes(outside, outside_snapshot(s.path))
    except Exception as err:  # a harness bug: shown, counted, never fatal
        where = traceback.extract_tb(err.__traceback__)[-1]
        observed = Observed("harness error", f"{type(err).__name__}: {err} (line {where.lineno})")
        problems.append("HARNESS BUG: " + observed.line)
    finally:
        s.cleanup()
        shutil.rmtree(s.path, ignore_errors=True)
    return Row(case, observed, observed.problems + problems, time.perf_counter() - started)


def simple(
    id: str,
    item: int,
    argv: list[str],
    codes: Sequence[int],
    victims: tuple[str, ...] = (),
    prepare: Callable[[Scratch], None] | None = None,
    mention: Sequence[str] = (),
    say: Sequence[str] = (),
    may_change: tuple[str, ...] = (),
    guard_extra: tuple[str, ...] = (),
    note: str = "",
    after: Callable[[Scratch, Res], list[str]] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> Case:
    """A case of one in-process command: expected exit codes, what the error line names (``mention``),
    what the output says (``say``), and ``after``'s checks."""

    def fn(s: Scratch) -> Observed:
        with environ(**{k: v.replace("{S}", str(s.path)) for k, v in (env or {}).items()}):
            if cwd is not None:
                os.chdir(s / cwd)
            res = invoke(expand(argv))
        problems = check(res, codes, mention, say)
        if after is not None:
            problems += after(s, res)
        return Observed(str(res.code), res.line, problems)

    return Case(
        id, item, show(argv), expected_text(codes, mention, say, note), fn, victims, prepare, may_change, guard_extra
    )


# ------------------------------------------------------------------------------------- small prepares


def put(rel: str, text: str = "my notes: keep") -> Callable[[Scratch], None]:
    """A prepare that adds a user's file (parents created)."""

    def prepare(s: Scratch) -> None:
        (s / rel).parent.mkdir(parents=True, exist_ok=True)
        (s / rel).write_text(text)

    return prepare


def marker(folder: str, content: str) -> Callable[[Scratch], None]:
    return put(f"{folder}/.bora_pyro.json", content)


def chain(*prepares: Callable[[Scratch], None]) -> Callable[[Scratch], None]:
    def prepare(s: Scratch) -> None:
        for p in prepares:
            p(s)

    return prepare


def link(name: str, target: str) -> Callable[[Scratch], None]:
    return lambda s: os.symlink(target, s / name)


def damage(rel: str, how: str, then_reseal: bool = False) -> Callable[[Scratch], None]:
    """A prepare that damages the file ``rel`` (see :data:`DAMAGES`), then optionally reseals its folder."""

    def prepare(s: Scratch) -> None:
        DAMAGES[how](s / rel)
        if then_reseal:
            reseal((s / rel).parent)

    return prepare


def remove(rel: str) -> Callable[[Scratch], None]:
    def prepare(s: Scratch) -> None:
        path = s / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    return prepare


def no_leftovers(s: Scratch, res: Res) -> list[str]:
    found = leftovers(s.path)
    return [f"left behind: {', '.join(found[:3])}"] if found else []


def status_is(folder: str, status: str) -> Callable[[Scratch, Res], list[str]]:
    def after(s: Scratch, res: Res) -> list[str]:
        try:
            found = json.loads((s / folder / "status.json").read_text()).get("status")
        except (OSError, ValueError) as err:
            return [f"{folder}/status.json unreadable afterwards ({err})"]
        return [] if found == status else [f"{folder} is marked {found!r}, expected {status!r}"]

    return after


# ----------------------------------------------------------------------------- item 1: --overwrite kinds


def item1() -> list[Case]:
    t, r, o = "{T}", "{RUN}", "--overwrite"
    deep_data = ["--data", "csv:../../data.csv"]
    return [
        simple("1.01", 1, ["export", r, "--out", r, o], (2,), ("run",), mention=("source",)),
        simple(
            "1.02",
            1,
            ["export", "{TRAINED}", "--out", "{TRAINED}.checkpoint", o],
            (2,),
            ("trained",),
            mention=("checkpoint",),
        ),
        simple("1.03", 1, ["export", r, "--out", "{SWEEP}", o], (2,), ("run", "sweep"), mention=("sweep",)),
        simple("1.04", 1, ["train", t, "--out", "{SWEEP}", o], (2,), ("sweep",), mention=("sweep",)),
        simple("1.05", 1, ["train", t, "--out", "{EXPORT}", o], (2,), ("export",), mention=("export",)),
        simple("1.06", 1, ["sweep", t, "--taus", "1", "--out", r], (2,), ("run",)),
        simple("1.07", 1, ["adapt", r, "--data", "csv:{CSV}", "--out", r, o], (2,), ("run",), mention=("source",)),
        simple(
            "1.08",
            1,
            ["export", r, "--out", f"{r}/sub"],
            (2,),
            ("run",),
            mention=("source",),
            note="no folder created inside RUN",
        ),
        simple(
            "1.09",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            put("run/notes.txt"),
            mention=("notes.txt",),
            note="user file RUN/notes.txt kept",
        ),
        simple(
            "1.10",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            put("run/mine/data.txt"),
            mention=("mine",),
            note="user folder RUN/mine/ kept",
        ),
        simple(
            "1.11",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            put("run/gates.csv", "my,table"),
            mention=("gates.csv",),
            note="user file named like a tool file (not in the manifest)",
        ),
        simple(
            "1.12",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            put("run/.notes.tmp-keep"),
            mention=("notes",),
            note="user file named like a temporary",
        ),
        simple(
            "1.13",
            1,
            ["train", t, "--out", r, o],
            (2, 4),
            ("run",),
            lambda s: set_json(s / "run" / "metrics.json", ("my_note",), "edited by hand"),
            mention=("metrics.json",),
            note="a user edited RUN/metrics.json",
        ),
        simple(
            "1.14",
            1,
            ["export", r, "--out", "{EXPORT}", o],
            (2,),
            ("run", "export"),
            put("export/a/my_notes.txt"),
            mention=("my_notes",),
            note="user file inside a task sub-folder",
        ),
        simple(
            "1.15",
            1,
            ["sweep", t, "--taus", "1,10", "--out", "{SWEEP}"],
            (2,),
            ("sweep",),
            put("sweep/runs/tau=10/notes.txt"),
            mention=("notes.txt",),
            may_change=("sweep",),
            guard_extra=("sweep/runs",),
            note="user file in SWEEP/runs/tau=10/",
        ),
        simple(
            "1.16",
            1,
            ["sweep", t, "--taus", "1", "--out", "{SWEEP}"],
            (0,),
            ("sweep",),
            put("sweep/runs/tau=1/notes.txt"),
            may_change=("sweep",),
            guard_extra=("sweep/runs",),
            note="finished tau not rerun; user file in SWEEP/runs/tau=1/ kept",
        ),
        simple(
            "1.17",
            1,
            ["sweep", t, "--taus", "1", "--out", "{SWEEP}"],
            (0, 2),
            ("sweep",),
            put("sweep/notes.txt"),
            may_change=("sweep",),
            guard_extra=("sweep/notes.txt", "sweep/runs"),
            note="user file SWEEP/notes.txt kept",
        ),
        simple(
            "1.18",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            marker("run", '{"kind": "export", "bora_pyro_version": "0.1.0"}'),
            mention=("export",),
            note="RUN's marker claims export",
        ),
        simple(
            "1.19",
            1,
            ["train", t, "--out", "{EXPORT}", o],
            (2,),
            ("export",),
            marker("export", '{"kind": "run", "bora_pyro_version": "0.1.0"}'),
            note="an export whose marker claims run",
        ),
        simple(
            "1.20",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            marker("run", '{"kind": "banana"}'),
            note="marker of an unknown kind",
        ),
        simple(
            "1.21", 1, ["train", t, "--out", r, o], (2,), ("run",), marker("run", "{not json"), note="marker not JSON"
        ),
        simple(
            "1.22",
            1,
            ["train", t, "--out", r, o],
            (2,),
            ("run",),
            chain(remove("run/.bora_pyro.json"), remove("run/manifest.json"), put("run/notes.txt")),
            mention=("notes.txt",),
            note="older format (config.json + adapters, no marker) with a user file",
        ),
        simple(
            "1.23",
            1,
            ["train", t, "--out", ".", o],
            (2,),
            ("run",),
            put(".bora_pyro.json", '{"kind": "run"}'),
            note="the working directory, marked as a run",
        ),
        simple(
            "1.24",
            1,
            ["train", t, "--out", "{HOME}", o],
            (2,),
            (),
            put("home/.bora_pyro.json", '{"kind": "run"}'),
            note="the home folder, marked as a run",
        ),
        simple("1.25", 1, ["train", t, "--out", "/", o], (2,), (), note="the root folder"),
        simple(
            "1.26",
            1,
            ["export", "nest/run", "--out", "nest", o],
            (2,),
            ("run",),
            chain(
                lambda s: (s / "nest").mkdir(),
                lambda s: (s / "run").rename(s / "nest" / "run"),
                marker("nest", '{"kind": "export"}'),
            ),
            note="--out a parent of the source (marked export)",
        ),
        simple(
            "1.27",
            1,
            ["train", t, *deep_data, "--out", "..", o],
            (2,),
            (),
            chain(put("deep/er/keep.txt"), marker("deep", '{"kind": "run"}')),
            cwd="deep/er",
            note="--out a parent of the working directory",
        ),
        simple("1.28", 1, ["export", r, "--out", f"{r}/../{r}", o], (2,), ("run",), mention=("source",)),
        simple(
            "1.29", 1, ["adapt", r, "--data", "csv:{CSV}", "--out", f"x/../{r}", o], (2,), ("run",), mention=("source",)
        ),
        simple("1.30", 1, ["train", t, "--out", "notes.txt", o], (2,), (), put("notes.txt"), note="--out a file"),
        simple("1.31", 1, ["export", r, "--out", "notes.txt", o], (2,), ("run",), put("notes.txt")),
        simple(
            "1.32",
            1,
            ["export", r, "--format", "merged", "--task", "a", "--out", "{EXPORT}", o],
            (2,),
            ("run", "export"),
            mention=("export",),
        ),
        simple("1.33", 1, ["export", r, "--out", "{MERGED}", o], (2,), ("run", "merged"), mention=("merged",)),
        simple(
            "1.34",
            1,
            ["train", t, "--out", "{TRAINED}", o],
            (2,),
            ("trained",),
            put("trained.checkpoint/notes.txt"),
            mention=("notes.txt",),
            note="user file in TRAINED.checkpoint/",
        ),
        simple(
            "1.35", 1, ["train", t, "--out", "{TRAINED}.checkpoint", o], (2,), ("trained",), mention=("checkpoint",)
        ),
        simple("1.36", 1, ["sweep", t, "--taus", "1", "--out", "{EXPORT}"], (2,), ("export",)),
        simple("1.37", 1, ["sweep", t, "--taus", "1", "--out", "notes.txt"], (2,), (), put("notes.txt")),
        simple(
            "1.38",
            1,
            ["train", t, "--out", r, o],
            (0,),
            ("run",),
            may_change=("run",),
            note="control: a clean run is replaced",
        ),
        simple(
            "1.39",
            1,
            ["export", r, "--out", "{EXPORT}", o],
            (0,),
            ("run", "export"),
            may_change=("export",),
            note="control: a clean export is replaced",
        ),
        simple(
            "1.40",
            1,
            ["export", r, "--format", "merged", "--task", "a", "--out", "{MERGED}", o],
            (0,),
            ("run", "merged"),
            may_change=("merged",),
            note="control",
        ),
        simple(
            "1.41",
            1,
            ["adapt", r, "--data", "csv:{CSV}", "--out", "{RUNP}", o],
            (0,),
            ("run", "runp"),
            may_change=("runp",),
            note="control: adapt replaces another clean run",
        ),
    ]


# --------------------------------------------------------------------------- item 2: readers and writers


def during_write(reader: list[str], target: str = "run", extra: Sequence[str] = ()) -> Callable[[Scratch], Observed]:
    """A ``train --overwrite`` of ``target`` runs in a subprocess; while it fits (holding the lock), a
    ``.TARGET.tmp-*`` of its is planted and ``reader`` runs here; the planted folder and the writer's
    checkpoint must survive, and the writer must then finish."""

    def fn(s: Scratch) -> Observed:
        argv = ["train", "{T}", *extra, "--steps", "300", "--eval-every", "300", "--checkpoint-every", "100000"]
        writer = spawn(expand([*argv, "--out", target, "--overwrite"]), s.path)
        s.procs.append(writer)
        checkpoint = s / f"{target}.checkpoint"
        if not wait_for(checkpoint.is_dir, writer, 120):
            res = finish(writer, 30)
            return Observed(f"writer {res.code}", res.line, ["the writer never started fitting (harness)"])
        planted = s / f".{target}.tmp-planted"
        planted.mkdir()
        (planted / "adapters.safetensors").write_bytes(b"being written")
        old = tree_digest(s / target)
        res = invoke(expand(reader))
        problems = check(res, (0, 75))
        now = tree_digest(s / target)
        if not planted.is_dir():
            problems.append("the reader deleted the writer's .NAME.tmp-* folder")
        if not checkpoint.is_dir() and writer.poll() is None:
            problems.append("the reader deleted the writer's checkpoint folder")
        if now.get("config.json") != old.get("config.json") or writer.poll() is not None:
            problems.append("harness: the writer had replaced the folder before the reader returned")
        elif now != old:
            problems.append(f"the reader wrote into {target.upper()} while another process held its lock")
        done = finish(writer)
        problems += [f"writer: {p}" for p in check(done, (0,))]
        if done.code == 0:
            problems += [f"afterwards: {p}" for p in check(invoke(["evaluate", target]), (0,))]
        return Observed(f"reader {res.code}, writer {done.code}", res.line, problems)

    return fn


def with_lock(folder: str, argv: list[str], codes: Sequence[int], plant: bool = True) -> Callable[[Scratch], Observed]:
    """``argv`` runs while another process holds ``folder``'s lock (with a planted ``.FOLDER.tmp-*``)."""

    def fn(s: Scratch) -> Observed:
        planted = s / f".{Path(folder).name}.tmp-planted"
        if plant:
            planted.mkdir()
            (planted / "config.json").write_text("{}")
        with lock_held(s, folder):
            res = invoke(expand(argv))
        problems = check(res, codes)
        if plant and not planted.is_dir():
            problems.append("deleted the other process's .NAME.tmp-* folder")
        return Observed(str(res.code), res.line, problems)

    return fn


def aside(folder: str) -> Callable[[Scratch], None]:
    """Rename ``folder`` aside as a replacement in progress does (``.NAME.old-PID-ID``)."""
    return lambda s: (s / folder).rename(s / f".{folder}.old-99999-abcdef")


def item2() -> list[Case]:
    busy = "another process holds the lock"
    cases = [
        Case(
            "2.01",
            2,
            show(["generate", "{RUN}", *GEN]) + "  # during train --out RUN --overwrite",
            "exit 0 or 75; the writer's .RUN.tmp-* and checkpoint survive; the writer then exits 0",
            during_write(["generate", "{RUN}", *GEN]),
            ("run",),
            may_change=("run",),
        ),
        Case(
            "2.02",
            2,
            show(["evaluate", "{RUN}"]) + "  # during train --out RUN --overwrite",
            "exit 0 or 75; the writer's .RUN.tmp-* and checkpoint survive; the writer then exits 0",
            during_write(["evaluate", "{RUN}"]),
            ("run",),
            may_change=("run",),
        ),
        Case(
            "2.03",
            2,
            show(["train", "--resume", "{RUN}"]) + "  # during train --out RUN --overwrite",
            "exit 0 or 75; the writer's .RUN.tmp-* and checkpoint survive; the writer then exits 0",
            during_write(["train", "--resume", "{RUN}"]),
            ("run",),
            may_change=("run",),
        ),
        Case(
            "2.04",
            2,
            show(["diagnose", "{RUNP}"]) + "  # during train --out RUNP --overwrite",
            "exit 0 or 75; the writer's .RUNP.tmp-* and checkpoint survive; the writer then exits 0",
            during_write(["diagnose", "{RUNP}"], "runp", ("--posterior-samples", "2")),
            ("runp",),
            may_change=("runp",),
        ),
    ]
    locked = [
        ("2.05", "run", ["evaluate", "{RUN}"], (0, 75), ("run",), None, True),
        ("2.06", "run", ["generate", "{RUN}", *GEN], (0, 75), ("run",), None, True),
        ("2.07", "run", ["export", "{RUN}", "--out", "e"], (0, 75), ("run",), None, True),
        ("2.08", "runp", ["diagnose", "{RUNP}"], (0, 75), ("runp",), None, True),
        ("2.09", "run", ["evaluate", "{RUN}"], (75,), ("run",), aside("run"), False),
        ("2.10", "run", ["generate", "{RUN}", *GEN], (75,), ("run",), aside("run"), False),
        ("2.11", "run", ["train", "--resume", "{RUN}"], (75,), ("run",), aside("run"), False),
        ("2.12", "trained", ["evaluate", "{TRAINED}"], (75,), ("trained",), None, True),
        ("2.13", "trained", ["train", "--resume", "{TRAINED}"], (75,), ("trained",), None, True),
        ("2.14", "run", ["train", "{T}", "--out", "{RUN}", "--overwrite"], (75,), ("run",), None, True),
        (
            "2.15",
            "export",
            ["export", "{RUN}", "--out", "{EXPORT}", "--overwrite"],
            (75,),
            ("run", "export"),
            None,
            True,
        ),
    ]
    for id, folder, argv, codes, victims, prepare, plant in locked:
        state = "RUN renamed aside (.RUN.old-*), " if prepare else ""
        cases.append(
            Case(
                id,
                2,
                show(argv) + f"  # {busy} of {folder.upper()}",
                f"{state}{expected_text(codes)}; nothing of the other process's deleted; victims unchanged",
                with_lock(folder, argv, codes, plant),
                victims,
                prepare,
            )
        )
    return cases


# ------------------------------------------------------------------------------ item 3: extreme values

SETTING_KEYS = ("model", "data", "device", "posterior_samples", "corpus", "adapter", "prior", "gates", "train")


def same_settings(a: Path, b: Path) -> list[str]:
    """The settings of two run folders' config.json that differ (a --config round trip must keep them all)."""
    try:
        first, second = json.loads(a.read_text()), json.loads(b.read_text())
    except (OSError, ValueError) as err:
        return [f"--config: cannot compare config.json ({err})"]
    differ = []
    for key in SETTING_KEYS:
        x, y = first.get(key), second.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            differ += [f"{key}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            differ.append(key)
    return [f"--config: settings changed in the round trip: {', '.join(differ[:6])}"] if differ else []


def roundtrip(options: list[str], codes: Sequence[int]) -> Callable[[Scratch], Observed]:
    """Train with extreme ``options``; a run that was written must evaluate, export, resume and serve as
    ``--config`` with the same settings; a refusal must be one line and write nothing."""

    def fn(s: Scratch) -> Observed:
        res = invoke(expand(["train", "{T}", *options, "--out", "x"]))
        steps, problems = [("train", res)], [f"train: {p}" for p in check(res, codes)]
        if res.code == 2 and (s / "x").exists():
            problems.append("train: refused, yet x was written")
        if res.code in (0, 1):
            follow = [("evaluate", ["evaluate", "x"], (0,)), ("export", ["export", "x", "--out", "xe"], (0,))]
            if res.code == 0:
                follow.append(("resume", ["train", "--resume", "x"], (0,)))
            follow.append(("--config", ["train", "--config", "x/config.json", "--out", "xc"], (res.code,)))
            for label, argv, want in follow:
                step = invoke(argv)
                steps.append((label, step))
                problems += [f"{label}: {p}" for p in check(step, want)]
            if (s / "xc" / "config.json").is_file():
                problems += same_settings(s / "x" / "config.json", s / "xc" / "config.json")
        return steps_observed(steps, problems)

    return fn


def killed_then_resumed(options: list[str]) -> Callable[[Scratch], Observed]:
    """Train with ``options`` in a subprocess killed after the fitted state is written, then resume and
    evaluate here (the checkpoint's spec.json and the folder's config.json are read back)."""

    def fn(s: Scratch) -> Observed:
        killed = finish(spawn(expand(["train", "{T}", *options, "--out", "x"]), s.path, crash="run.fitted:1"))
        steps = [("killed train", killed)]
        problems = [] if killed.code == 137 else [f"killed train: exit {killed.code}, expected 137 (the kill)"]
        for label, argv in (("resume", ["train", "--resume", "x"]), ("evaluate", ["evaluate", "x"])):
            step = invoke(argv)
            steps.append((label, step))
            problems += [f"{label}: {p}" for p in check(step, (0,))]
        problems += status_is("x", "complete")(s, steps[-1][1])
        return steps_observed(steps, problems)

    return fn


EXTREMES: list[tuple[str, list[str], tuple[int, ...]]] = [
    ("3.01", ["--tau", "inf"], (0,)),
    ("3.02", ["--clip-norm", "inf"], (0,)),
    ("3.03", ["--weight-decay", "inf"], (0, 1, 2)),
    ("3.04", ["--rank-lambda", "inf", "--quant-lambda", "inf"], (0, 2)),
    ("3.05", ["--gate-init=-inf"], (0, 2)),
    ("3.06", ["--rank-gates", "--rank-lambda", "1e308", "--gate-init", "1e308"], (0, 1, 2)),
    ("3.07", ["--quant-gates", "weights+activations", "--quant-lambda", "inf"], (0, 1, 2)),
    ("3.08", ["--seed", str(2**63 - 1)], (0, 2)),
    (
        "3.09",
        [
            "--max-train-docs",
            "10**18",
            "--max-eval-docs",
            "10**18",
            "--num-tasks",
            "10**18",
            "--patience",
            "10**18",
            "--checkpoint-every",
            "10**18",
            "--eval-every",
            "10**18",
            "--min-words",
            "10**18",
        ],
        (0,),
    ),
    (
        "3.10",
        [
            "--patience",
            "none",
            "--max-eval-docs",
            "none",
            "--max-train-docs",
            "none",
            "--checkpoint-every",
            "none",
            "--clip-norm",
            "none",
        ],
        (0,),
    ),
    ("3.11", ["--books", ",", "--translations", ","], (0,)),
    ("3.12", ["--targets", ","], (0, 2)),
    ("3.13", ["--tau", "5e-324"], (0, 1, 2)),
    ("3.14", ["--lr-tau-scaling", "--tau", "1e308"], (0, 1, 2)),
    ("3.15", ["--tau-prior", "lognormal:1e308,1e308"], (0, 2)),
    ("3.16", ["--global-prior", "normal:1e308"], (0, 1, 2)),
    ("3.17", ["--task-prompt", "\u300c{task}\u300d \u2603 {{x}} "], (0,)),
    ("3.18", ["--valid-fraction", "0.4999999", "--test-fraction", "1e-300"], (0, 2)),
    ("3.19", ["--lr", "5e-324", "--guide-lr", "1e308"], (0, 1, 2)),
    ("3.20", ["--max-tokens", "4"], (0, 2)),
    (
        "3.21",
        ["--inference", "vi", "--tau", "learn", "--tau-groups", "module", "--tau-prior", "gamma:1e-300,1e300"],
        (0, 1, 2),
    ),
]


def _big_ints(options: list[str]) -> list[str]:
    return [str(10**18) if o == "10**18" else o for o in options]


def item3() -> list[Case]:
    note = "then evaluate 0, export 0, resume 0 (a complete run), --config 0 with every setting equal"
    cases = [
        Case(
            id,
            3,
            show(["train", "{T}", *options, "--out", "X"]),
            expected_text(codes, note=note),
            roundtrip(_big_ints(options), codes),
        )
        for id, options, codes in EXTREMES
    ]
    # only values that must be accepted (a refusal of the others is allowed above)
    combined = "--tau inf --clip-norm inf --patience none --max-eval-docs none --max-train-docs none".split()
    combined += ["--num-tasks", str(10**18), "--eval-every", str(10**18), "--books", ",", "--checkpoint-every", "1"]
    cases.append(
        Case(
            "3.22",
            3,
            show(["train", "{T}", *combined, "--out", "X"]) + "  # killed at run.fitted:1; "
            "then train --resume X; evaluate X",
            "killed 137; resume 0; evaluate 0; X complete",
            killed_then_resumed(combined),
        )
    )
    return cases


# ----------------------------------------------------------------------------- item 4: symlinked --out


def link_written(target: str) -> Callable[[Scratch, Res], list[str]]:
    """After a command through a link: no renamed-aside or temporary copies; exit 0 wrote ``target`` as a
    run (or export) in place; a refusal left it as it was."""

    def after(s: Scratch, res: Res) -> list[str]:
        problems = no_leftovers(s, res)
        if res.code == 0 and not (s / target / ".bora_pyro.json").is_file():
            problems.append(f"exit 0 but the link's target {target} holds no folder of bora_pyro's")
        return problems

    return after


def item4() -> list[Case]:
    t, o = "{T}", "--overwrite"
    either = "the link's target written in place (the link kept) or refused; no .NAME.old-* left"
    return [
        simple(
            "4.01",
            4,
            ["train", t, "--out", "link"],
            (0, 2),
            (),
            chain(lambda s: (s / "target").mkdir(), link("link", "target")),
            may_change=("target",),
            after=link_written("target"),
            note="link -> an empty folder; " + either,
        ),
        simple(
            "4.02",
            4,
            ["train", t, "--out", "link", o],
            (0, 2),
            ("run",),
            link("link", "run"),
            may_change=("run",),
            after=link_written("run"),
            note="link -> RUN; " + either,
        ),
        simple(
            "4.03",
            4,
            ["train", t, "--out", "link"],
            (0, 2),
            (),
            link("link", "nowhere"),
            may_change=("nowhere",),
            after=link_written("nowhere"),
            note="a dangling link; " + either,
        ),
        simple(
            "4.04",
            4,
            ["train", t, "--out", "loopa"],
            (2,),
            (),
            chain(link("loopa", "loopb"), link("loopb", "loopa")),
            note="a symlink loop",
        ),
        simple(
            "4.05",
            4,
            ["export", "{RUN}", "--out", "link", o],
            (0, 2),
            ("run", "export"),
            link("link", "export"),
            may_change=("export",),
            after=link_written("export"),
            note="link -> EXPORT; " + either,
        ),
        simple(
            "4.06",
            4,
            ["export", "{RUN}", "--out", "link", o],
            (2,),
            ("run",),
            link("link", "run"),
            mention=("source",),
            note="link -> the source RUN",
        ),
        simple(
            "4.07",
            4,
            ["adapt", "{RUN}", "--data", "csv:{CSV}", "--out", "link", o],
            (2,),
            ("run",),
            link("link", "run"),
            mention=("source",),
            note="link -> the source RUN",
        ),
        simple("4.08", 4, ["evaluate", "link"], (0,), ("run",), link("link", "run"), note="read through a link"),
        simple(
            "4.09",
            4,
            ["sweep", t, "--taus", "1", "--out", "link"],
            (0, 2),
            ("sweep",),
            link("link", "sweep"),
            may_change=("sweep",),
            guard_extra=("sweep/runs",),
            after=link_written("sweep"),
            note="link -> SWEEP (finished tau kept); " + either,
        ),
        simple(
            "4.10",
            4,
            ["train", t, "--out", "dirlink/r"],
            (0,),
            (),
            chain(put("real/.keep"), link("dirlink", "real")),
            may_change=("real",),
            after=lambda s, res: [] if (s / "real" / "r" / "config.json").is_file() else ["real/r not written"],
            note="a run inside a linked folder",
        ),
        simple(
            "4.11",
            4,
            ["train", t, "--out", "{RUN}", o],
            (2,),
            ("run",),
            chain(put("notes.txt"), link("run/mylink", "../notes.txt")),
            mention=("mylink",),
            note="a user's link inside RUN",
        ),
        simple(
            "4.12",
            4,
            ["train", t, "--out", "{RUN}", o],
            (2, 4),
            ("run",),
            chain(
                put("mine.bin", "user data"),
                remove("run/adapters.safetensors"),
                link("run/adapters.safetensors", "../mine.bin"),
            ),
            note="RUN/adapters.safetensors is a link to a user file, which is kept",
        ),
        simple(
            "4.13",
            4,
            ["evaluate", "{RUN}"],
            (4,),
            ("run",),
            chain(
                put("mine.bin", "user data"),
                remove("run/adapters.safetensors"),
                link("run/adapters.safetensors", "../mine.bin"),
            ),
            mention=("adapters.safetensors",),
        ),
        simple(
            "4.14",
            4,
            ["export", "{RUN}", "--out", "link"],
            (2,),
            ("run",),
            chain(lambda s: (s / "run" / "sub").mkdir(), link("link", "run/sub")),
            mention=("source",),
            note="link -> an (empty) folder inside the source",
        ),
        simple(
            "4.15",
            4,
            ["train", "--resume", "link"],
            (0,),
            ("trained",),
            link("link", "trained"),
            may_change=("trained", "trained.checkpoint"),
            after=link_written("trained"),
            note="resume through a link",
        ),
    ]


# ------------------------------------------------------------------- item 5: an interrupted replacement


def finds(template: str, which: str) -> Callable[[Scratch, Res], list[str]]:
    """After a verb on a killed replacement: RUNP is the run of ``template`` (``which``: the old one, or the
    new one when the kill came after it was renamed in), and no leftover copies remain."""

    def after(s: Scratch, res: Res) -> list[str]:
        want, got = tree_digest(TEMPLATES / template), tree_digest(s / "runp")
        if not got:
            return ["RUNP is missing afterwards"] + no_leftovers(s, res)
        differ = [k for k in ("adapters.safetensors", "config.json", "corpus.json") if want.get(k) != got.get(k)]
        problems = [f"RUNP is not the {which} run ({', '.join(differ)} differ)"] if differ else []
        return problems + no_leftovers(s, res)

    return after


def item5() -> list[Case]:
    verbs = [
        ("5.01", ["evaluate", "{RUNP}"], (0,)),
        ("5.02", ["export", "{RUNP}", "--out", "e"], (0,)),
        ("5.03", ["generate", "{RUNP}", *GEN], (0,)),
        ("5.04", ["train", "--resume", "{RUNP}"], (0,)),
        ("5.05", ["diagnose", "{RUNP}"], (0,)),
        ("5.06", ["train", "{T}", "--posterior-samples", "2", "--out", "{RUNP}"], (2,)),
        ("5.07", ["adapt", "{RUNP}", "--data", "csv:{CSV}", "--out", "new"], (0,)),
        ("5.08", ["evaluate", "{RUNP}", "--json"], (0,)),
    ]
    cases = [
        simple(
            id,
            5,
            argv,
            codes,
            ("killed",),
            after=finds("runp", "old"),
            note="(killed after RUNP was renamed aside): finds the OLD run; no leftovers",
        )
        for id, argv, codes in verbs
    ]
    cases.append(
        simple(
            "5.09",
            5,
            ["evaluate", "{RUNP}"],
            (0,),
            ("killed_in",),
            after=finds("killed_in/runp", "new"),
            note="(killed after the new RUNP was renamed in): the NEW run; the old copy removed",
        )
    )
    for case in cases:  # recovery renames and deletes the copies (random names): only the user's entries guarded
        case.guard_only = ("data.csv", "home")
    return cases


# --------------------------------------------------------------------------------- item 6: corruption


def every_reader(victim: str, file: str) -> Callable[[Scratch], Observed]:
    """evaluate, generate and export of ``victim`` must each refuse with exit 4 naming ``file``."""

    def fn(s: Scratch) -> Observed:
        steps, problems = [], []
        for verb, args in (("evaluate", [victim]), ("generate", [victim, *GEN]), ("export", [victim, "--out", "e"])):
            res = invoke([verb, *args])
            steps.append((verb, res))
            problems += [f"{verb}: {p}" for p in check(res, (4,), mention=(file,))]
        return steps_observed(steps, problems)

    return fn


def item6() -> list[Case]:
    cases, n = [], 0
    files = (
        ("run", "adapters.safetensors"),
        ("trained", "fit_state.safetensors"),
        ("run", "config.json"),
        ("run", "metrics.json"),
    )
    for victim, file in files:
        for how in DAMAGES:
            n += 1
            cases.append(
                Case(
                    f"6.{n:02d}",
                    6,
                    f"bora-pyro evaluate|generate|export {victim.upper()}  # {how} in {file}",
                    f"each exit 4 naming {file}; {victim.upper()} unchanged (never completed)",
                    every_reader(victim, file),
                    (victim,),
                    damage(f"{victim}/{file}", how),
                )
            )
    extra = [
        (
            "6.17",
            "run",
            "adapters.safetensors",
            damage("run/adapters.safetensors", "NaN", then_reseal=True),
            "NaN in adapters.safetensors, manifest rewritten to match",
        ),
        (
            "6.18",
            "run",
            "adapters.safetensors",
            chain(damage("run/adapters.safetensors", "NaN"), remove("run/manifest.json")),
            "NaN in adapters.safetensors, manifest deleted (an older folder)",
        ),
        (
            "6.19",
            "run",
            "manifest.json",
            damage("run/manifest.json", "a flipped bit"),
            "a flipped bit in manifest.json",
        ),
        ("6.20", "run", "adapters.safetensors", remove("run/adapters.safetensors"), "adapters.safetensors deleted"),
        (
            "6.21",
            "run",
            "adapters.safetensors",
            lambda s: (set_first_float(s / "run" / "adapters.safetensors", float("inf")), reseal(s / "run")),
            "+inf in adapters.safetensors, manifest rewritten to match",
        ),
    ]
    for id, victim, file, prepare, what in extra:
        cases.append(
            Case(
                id,
                6,
                f"bora-pyro evaluate|generate|export {victim.upper()}  # {what}",
                f"each exit 4 naming {file}; {victim.upper()} unchanged",
                every_reader(victim, file),
                (victim,),
                prepare,
            )
        )
    nan_state = chain(remove("trained.checkpoint"), damage("trained/fit_state.safetensors", "NaN", then_reseal=True))
    flipped = chain(remove("trained.checkpoint"), damage("trained/fit_state.safetensors", "a flipped bit"))
    return cases + [
        simple(
            "6.22",
            6,
            ["evaluate", "{TRAINED}"],
            (4,),
            ("trained",),
            nan_state,
            mention=("fit_state",),
            note="NaN in the fitted state (resealed, no checkpoint): never scored, still marked trained",
        ),
        simple(
            "6.23",
            6,
            ["train", "--resume", "{TRAINED}"],
            (4,),
            ("trained",),
            flipped,
            mention=("fit_state",),
            note="a flipped bit in the fitted state, no checkpoint: never scored, still marked trained",
        ),
        simple(
            "6.24",
            6,
            ["export", "{RUN}", "--format", "merged", "--task", "a", "--out", "m"],
            (4,),
            ("run",),
            damage("run/adapters.safetensors", "NaN", then_reseal=True),
            mention=("adapters.safetensors",),
            note="NaN, resealed: the merged export refuses",
        ),
    ]


# ------------------------------------------------------------------------------ item 7: changed corpus


def write_rows(name: str, frame_of: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Scratch], None]:
    """A prepare that writes ``name`` as ``frame_of`` (the victims' corpus)."""
    return lambda s: frame_of(synthetic_rows(TASKS)).to_csv(s / name, index=False)


def other_texts(frame: pd.DataFrame) -> pd.DataFrame:
    return synthetic_rows(TASKS, seed=1)


def split_rows(frame: pd.DataFrame, split: str) -> list[int]:
    """The row numbers of ``frame`` (the victims' corpus) that the runs' split put in ``split``."""
    from bora_pyro.data.splitting import split_per_task

    docs = {task: [f"{i}" for i in frame.index[frame.task == task]] for task in dict.fromkeys(frame.task)}
    parts, _ = split_per_task(docs, 0.1, 0.1, seed=0)
    return [int(text) for _, text in parts[split]]


def changed_test_rows(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    rows = split_rows(frame, "test")
    frame.loc[rows, "text"] = frame.loc[rows, "text"] + " and then some other words"
    return frame


def shuffled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True)


def not_train_line(s: Scratch, res: Res) -> list[str]:
    return ["the line says the train split changed"] if re.search(r"\btrain:", res.line) else []


def item7() -> list[Case]:
    ev = ["evaluate", "{RUN}"]
    return [
        simple(
            "7.01",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", other_texts),
            mention=("test", "'a'"),
            note="same task names, other texts",
        ),
        simple(
            "7.02",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", lambda f: f[f.task != "c"]),
            mention=("'c'",),
            note="task c removed",
        ),
        simple(
            "7.03",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", lambda f: pd.concat([f, synthetic_rows({"d": 5}).assign(task="d")])),
            mention=("'d'",),
            note="task d added",
        ),
        simple(
            "7.04",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", changed_test_rows),
            mention=("test",),
            after=not_train_line,
            note="only test rows changed (the line does not blame train)",
        ),
        simple(
            "7.05",
            7,
            [*ev, "--data", "csv:other.csv"],
            (0,),
            ("run",),
            write_rows("other.csv", other_texts),
            note="other data, asked for explicitly",
        ),
        simple(
            "7.06",
            7,
            [*ev, "--data", "csv:{CSV}"],
            (0,),
            ("run",),
            write_rows("data.csv", other_texts),
            note="the changed training CSV, asked for explicitly",
        ),
        simple(
            "7.07",
            7,
            [*ev, "--split", "valid"],
            (2,),
            ("run",),
            write_rows("data.csv", other_texts),
            mention=("valid",),
            note="texts changed, valid split",
        ),
        simple("7.08", 7, ev, (2,), ("run",), remove("data.csv"), mention=("data.csv",), note="CSV deleted"),
        simple(
            "7.09",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", lambda f: f.replace({"task": {"c": "C"}})),
            mention=("'c'|'C'",),
            note="task c renamed C",
        ),
        simple(
            "7.10",
            7,
            [*ev, "--data", "csv:other.csv"],
            (2,),
            ("run",),
            write_rows("other.csv", lambda f: f[f.task != "c"]),
            mention=("'c'",),
            note="--data lacks one of the run's tasks",
        ),
        simple(
            "7.11",
            7,
            ev,
            (2,),
            ("run",),
            write_rows("data.csv", shuffled),
            mention=("test",),
            note="rows shuffled: other documents land in each split",
        ),
        simple(
            "7.12",
            7,
            ev,
            (0,),
            ("run",),
            write_rows("data.csv", lambda f: f.assign(extra=1)),
            note="control: only a column added, texts unchanged",
        ),
        simple(
            "7.13",
            7,
            [*ev, "--json"],
            (2,),
            ("run",),
            write_rows("data.csv", other_texts),
            mention=("test",),
            after=lambda s, res: ["JSON printed for changed data"] if res.stdout.strip() else [],
            note="--json prints no scores of changed data",
        ),
    ]


# ------------------------------------------------------------------------- item 8: checkpoint fallback


def slot_damage(how: Callable[[Path], None], index: int = 0) -> Callable[[Scratch], None]:
    return lambda s: how(newest_slot(s / "twoslot.checkpoint", index))


def garbage_json(slot: Path) -> None:
    (slot / "state.json").write_text("{ this is not json")


def no_sha(slot: Path) -> None:
    meta = json.loads((slot / "state.json").read_text())
    meta.pop("sha256", None)
    (slot / "state.json").write_text(json.dumps(meta))


def other_step(slot: Path) -> None:
    meta = json.loads((slot / "state.json").read_text())
    meta.setdefault("loop", {})["step"] = 1000
    (slot / "state.json").write_text(json.dumps(meta))


def fake_slot(s: Scratch) -> None:
    (s / "twoslot.checkpoint" / "step-99999999-ffffffff").mkdir()


def item8() -> list[Case]:
    resume = ["train", "--resume", "{TWOSLOT}"]
    fallback = "(older|fall(s|ing)? back|previous)"
    done = status_is("twoslot", "complete")
    mc = ("twoslot", "twoslot.checkpoint")
    variants = [
        ("8.01", slot_damage(lambda p: flip_bit(p / "state.safetensors")), "a flipped bit in the newest state"),
        ("8.02", slot_damage(garbage_json), "the newest state.json is not JSON"),
        ("8.03", slot_damage(lambda p: truncate(p / "state.safetensors")), "the newest state truncated"),
        ("8.04", slot_damage(no_sha), "the newest state.json has no sha256"),
        ("8.05", slot_damage(lambda p: (p / "state.safetensors").unlink()), "the newest state.safetensors deleted"),
        ("8.06", slot_damage(lambda p: set_first_float(p / "state.safetensors", float("nan"))), "NaN in the newest"),
        ("8.07", slot_damage(other_step), "the newest state.json edited (another step)"),
        ("8.08", fake_slot, "an empty folder named like a newer slot"),
    ]
    cases = [
        simple(
            id,
            8,
            resume,
            (0,),
            ("twoslot",),
            prepare,
            say=(fallback,),
            may_change=mc,
            after=done,
            note=f"{what}: falls back to the older slot, says so, completes",
        )
        for id, prepare, what in variants
    ]
    both = chain(
        slot_damage(lambda p: flip_bit(p / "state.safetensors")),
        slot_damage(lambda p: flip_bit(p / "state.safetensors"), 1),
    )
    return cases + [
        simple(
            "8.09",
            8,
            resume,
            (4,),
            ("twoslot",),
            both,
            mention=("state",),
            note="both slots damaged: refused naming the slots' files; nothing changed",
        ),
        simple(
            "8.10",
            8,
            resume,
            (0,),
            ("twoslot",),
            slot_damage(lambda p: flip_bit(p / "state.safetensors"), 1),
            may_change=mc,
            after=done,
            note="only the older slot damaged: resumes from the newest",
        ),
    ]


# ----------------------------------------------------------------------- item 9: one line, no traceback


def mounted(name: str, size: str, read_only: bool = False) -> Callable[[Scratch], None]:
    """A prepare that mounts a tmpfs of ``size`` at ``name`` (a full disk; ``read_only``: a read-only one)."""

    def prepare(s: Scratch) -> None:
        (s / name).mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(s / name)], capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        s.mounts.append(s / name)

    return prepare


def nothing_half_written(folder: str) -> Callable[[Scratch, Res], list[str]]:
    def after(s: Scratch, res: Res) -> list[str]:
        found = leftovers(s / folder) if (s / folder).is_dir() else []
        return [f"half-written leftovers in {folder}: {', '.join(found[:3])}"] if found else []

    return after


def write_json_file(name: str, value: object) -> Callable[[Scratch], None]:
    return put(name, value if isinstance(value, str) else json.dumps(value))


def edited_run(keys: Sequence[str], value: object, then_reseal: bool) -> Callable[[Scratch], None]:
    def prepare(s: Scratch) -> None:
        if keys:
            set_json(s / "run" / "config.json", keys, value)
        else:
            (s / "run" / "config.json").write_text(json.dumps(value))
        if then_reseal:
            reseal(s / "run")

    return prepare


def status_file(value: object, then_reseal: bool) -> Callable[[Scratch], None]:
    def prepare(s: Scratch) -> None:
        (s / "run" / "status.json").write_text(json.dumps(value))
        if then_reseal:
            reseal(s / "run")

    return prepare


def reserved_task(name: str) -> Callable[[Scratch], Observed]:
    """A task named like one of export's own files: train, then export; each works or refuses in one line."""

    def fn(s: Scratch) -> Observed:
        rows = synthetic_rows(TASKS).replace({"task": {"a": name}})
        rows.to_csv(s / "names.csv", index=False)
        steps = [("train", invoke(expand(["train", "{T}", "--data", "csv:names.csv", "--out", "r"])))]
        problems = [f"train: {p}" for p in check(steps[0][1], (0, 2))]
        if steps[0][1].code == 0:
            steps.append(("export", invoke(["export", "r", "--out", "e"])))
            problems += [f"export: {p}" for p in check(steps[1][1], (0, 2))]
            if steps[1][1].code == 0:
                problems += _export_intact(s / "e", name)
        return steps_observed(steps, problems)

    return fn


def _export_intact(folder: Path, task: str) -> list[str]:
    try:
        mapping = json.loads((folder / "tasks.json").read_text())
    except (OSError, ValueError) as err:
        return [f"export: tasks.json unreadable ({err})"]
    problems = [] if isinstance(mapping, dict) and task in mapping else [f"export: tasks.json does not map {task!r}"]
    if not (folder / "README.md").is_file():
        problems.append("export: README.md is not a file")
    return problems


def signalled(sig: int, code: int) -> Callable[[Scratch], Observed]:
    """A training subprocess gets ``sig`` while it fits; exit ``code`` and one 'interrupted' line."""

    def fn(s: Scratch) -> Observed:
        argv = ["train", "{T}", "--steps", "300", "--eval-every", "300", "--checkpoint-every", "100", "--out", "r"]
        proc = spawn(expand(argv), s.path)
        s.procs.append(proc)
        if not wait_for((s / "r.checkpoint").is_dir, proc, 120):
            res = finish(proc, 30)
            return Observed(str(res.code), res.line, ["the training never started fitting (harness)"])
        time.sleep(0.5)
        proc.send_signal(sig)
        res = finish(proc, 120)
        return Observed(str(res.code), res.line, check(res, (code,), say=("interrupted",)))

    return fn


def cuda_device() -> str:
    """A CUDA device that is not there: ``cuda`` without CUDA, else a device number past the last."""
    import torch

    return "cuda:63" if torch.cuda.is_available() else "cuda"


def item9() -> list[Case]:
    t, r = "{T}", "{RUN}"
    cases = [simple("9.01", 9, ["--help"], (0,), say=("usage",))]
    cases += [simple(f"9.{2 + i:02d}", 9, [verb, "--help"], (0,), say=("usage",)) for i, verb in enumerate(VERBS)]
    cuda = cuda_device()
    bad_config = [
        ("9.25", {"adapter": {"rank": True}}, ("rank",), "rank: true"),
        ("9.26", [1, 2, 3], (), "a top-level list"),
        ("9.27", '{"adapter": {"rank": 1e400}}', ("rank",), "rank: 1e400 (inf)"),
        ("9.28", "{ not json", ("bad.json",), "not JSON"),
        ("9.29", {"trust_remote_code": True}, ("trust",), "trust_remote_code: true"),
        ("9.30", {"adapter": {"rank": 4, "colour": "red"}}, ("colour",), "an unknown setting"),
    ]
    cases += [
        simple(
            "9.09",
            9,
            ["train", t, "--out", "full/run"],
            (3,),
            (),
            mounted("full", "32k"),
            mention=("full",),
            after=nothing_half_written("full"),
            note="disk full (a 32 KB tmpfs); nothing half-written",
        ),
        simple(
            "9.10",
            9,
            ["export", r, "--out", "full/e"],
            (3,),
            ("run",),
            mounted("full", "16k"),
            mention=("full",),
            after=nothing_half_written("full"),
            note="disk full (a 16 KB tmpfs)",
        ),
        simple(
            "9.11",
            9,
            ["train", t, "--out", "ro/run"],
            (3,),
            (),
            mounted("ro", "1m", read_only=True),
            mention=("ro",),
            note="a read-only folder (a read-only tmpfs)",
        ),
        simple(
            "9.12",
            9,
            ["train", t, "--out", "{CSV}/run"],
            (2, 3),
            (),
            mention=("data.csv",),
            note="a file where a folder is expected",
        ),
        simple(
            "9.13",
            9,
            ["evaluate", r],
            (2, 3),
            ("run",),
            put("cachefile", "x"),
            mention=("cachefile",),
            env={"BORA_PYRO_CACHE": "{S}/cachefile"},
            note="$BORA_PYRO_CACHE is a file",
        ),
        simple(
            "9.14",
            9,
            ["evaluate", r],
            (4,),
            ("run",),
            chain(put("run/adapters.safetensors", "garbage, not safetensors"), remove("run/manifest.json")),
            mention=("adapters.safetensors",),
            note="SafetensorError: garbage adapters, no manifest",
        ),
        simple(
            "9.15",
            9,
            ["export", r, "--out", "e"],
            (4,),
            ("run",),
            chain(
                lambda s: (s / "run" / "adapters.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
                remove("run/manifest.json"),
            ),
            mention=("adapters.safetensors",),
            note="SafetensorError: a header length past the end",
        ),
        simple("9.16", 9, ["train", t, "--device", "foo", "--out", "x"], (2,), mention=("foo",)),
        simple("9.17", 9, ["evaluate", r, "--device", "foo"], (2,), ("run",), mention=("foo",)),
        simple("9.18", 9, ["generate", r, *GEN, "--device", "foo"], (2,), ("run",), mention=("foo",)),
        simple(
            "9.19",
            9,
            ["train", t, "--device", cuda, "--out", "x"],
            (2,),
            mention=("cuda",),
            note="a CUDA device that is not there",
        ),
        simple("9.20", 9, ["evaluate", r, "--device", cuda], (2,), ("run",), mention=("cuda",)),
        simple("9.21", 9, ["train", t, "--task-prompt", "{task}{0}", "--out", "x"], (2,), mention=("task",)),
        simple("9.22", 9, ["train", t, "--task-prompt", "{task!r}: ", "--out", "x"], (2,)),
        simple("9.23", 9, ["train", t, "--task-prompt", "{task", "--out", "x"], (2,)),
        simple("9.24", 9, ["train", t, "--task-prompt", "{task.__class__.__mro__}", "--out", "x"], (2,)),
    ]
    cases += [
        simple(
            id,
            9,
            ["train", "--config", "bad.json", t, "--out", "x"],
            (2,),
            (),
            write_json_file("bad.json", value),
            mention=mention,
            note=f"--config with {what}",
        )
        for id, value, mention, what in bad_config
    ]
    cases += [
        simple("9.31", 9, ["train", "--config", "nowhere.json", t, "--out", "x"], (2,), mention=("nowhere.json",)),
        simple("9.32", 9, ["train", "--config", r, t, "--out", "x"], (2, 3), ("run",), note="--config a folder"),
        simple(
            "9.33",
            9,
            ["evaluate", r],
            (2, 4),
            ("run",),
            edited_run(("adapter", "rank"), True, True),
            mention=("rank|config.json",),
            note="RUN/config.json rank: true, manifest resealed",
        ),
        simple(
            "9.34",
            9,
            ["evaluate", r],
            (2, 4),
            ("run",),
            edited_run((), [1, 2], True),
            mention=("config.json",),
            note="RUN/config.json a top-level list, resealed",
        ),
        simple(
            "9.35",
            9,
            ["evaluate", r],
            (4,),
            ("run",),
            status_file({}, False),
            mention=("status.json",),
            note="status.json of {}",
        ),
        simple(
            "9.36",
            9,
            ["evaluate", r],
            (2, 4),
            ("run",),
            status_file({}, True),
            mention=("status.json",),
            note="status.json of {}, resealed",
        ),
        simple(
            "9.37",
            9,
            ["generate", r, *GEN],
            (2, 4),
            ("run",),
            status_file([], True),
            mention=("status.json",),
            note="status.json of [], resealed",
        ),
        simple(
            "9.38",
            9,
            ["train", "--resume", "{TRAINED}"],
            (0, 4),
            ("trained",),
            lambda s: no_sha(newest_slot(s / "trained.checkpoint")),
            mention=("state.json|sha256",),
            may_change=("trained", "trained.checkpoint"),
            note="the newest state.json without sha256",
        ),
        simple(
            "9.39",
            9,
            ["train", "--resume", "{TWOSLOT}"],
            (4,),
            ("twoslot",),
            chain(slot_damage(no_sha), slot_damage(no_sha, 1)),
            mention=("sha256|state.json",),
            note="every state.json without sha256",
        ),
        simple(
            "9.40",
            9,
            ["diagnose", "{RUNP}"],
            (4,),
            ("runp",),
            damage("runp/posterior.nc", "a flipped bit"),
            mention=("posterior.nc",),
            note="a corrupt posterior.nc",
        ),
        simple(
            "9.41",
            9,
            ["diagnose", "garbage.nc"],
            (2, 4),
            (),
            put("garbage.nc", "not netCDF"),
            mention=("garbage.nc",),
            note="a loose file that is not netCDF",
        ),
        simple(
            "9.42",
            9,
            ["diagnose", r],
            (0,),
            ("run",),
            mention=("posterior.nc",),
            note="a run without posterior.nc: its collapsed report, and a line that the ArviZ part needs one",
        ),
        simple(
            "9.43",
            9,
            ["diagnose", "{RUNP}"],
            (4,),
            ("runp",),
            chain(lambda s: truncate(s / "runp" / "posterior.nc"), lambda s: reseal(s / "runp")),
            mention=("posterior.nc",),
            note="a truncated posterior.nc, resealed",
        ),
    ]
    bad_values = [
        ("9.44", ["--alpha", "inf"], ("alpha",)),
        ("9.45", ["--alpha", "nan"], ("alpha",)),
        ("9.46", ["--tau", "learn", "--inference", "vi", "--tau-prior", "lognormal:nan,2"], ("tau",)),
        ("9.47", ["--tau", "learn", "--inference", "vi", "--tau-prior", "gamma:-1,1"], ("tau",)),
        ("9.48", ["--tau-prior", "lognormal:1"], ("tau",)),
        ("9.49", ["--global-prior", "normal:inf"], ("global",)),
        ("9.50", ["--tau", "nan"], ("tau",)),
        ("9.51", ["--lr", "inf"], ("lr",)),
        ("9.52", ["--valid-fraction", "nan"], ("valid",)),
        ("9.53", ["--eval-every", "0"], ("eval",)),
        ("9.54", ["--steps", "1e3"], ("steps",)),
    ]
    cases += [simple(id, 9, ["train", t, *v, "--out", "x"], (2,), mention=m) for id, v, m in bad_values]
    gen_values = [
        ("9.55", ["--top-p", "0"], (2,), ("top",)),
        ("9.56", ["--top-p", "5"], (2,), ("top",)),
        ("9.57", ["--top-p", "nan"], (2,), ("top",)),
        ("9.58", ["--temperature", "-1"], (2,), ("temperature",)),
        ("9.59", ["--temperature", "0"], (0, 2), ("temperature",)),
        ("9.60", ["--max-new-tokens", "-5"], (2,), ("max",)),
        ("9.61", ["--task", "nosuch"], (2,), ("nosuch",)),
    ]
    cases += [simple(id, 9, ["generate", r, *GEN, *v], c, ("run",), mention=m) for id, v, c, m in gen_values]
    cases += [
        Case(
            "9.62",
            9,
            show(["train", "{T}", "--data", "csv:names.csv", "--out", "R"]) + "; export R --out E",
            "a task named tasks.json: train and export 0 (tasks.json maps it) or 2 in one line",
            reserved_task("tasks.json"),
        ),
        Case(
            "9.63",
            9,
            show(["train", "{T}", "--data", "csv:names.csv", "--out", "R"]) + "; export R --out E",
            "a task named README.md: train and export 0 (README.md a file) or 2 in one line",
            reserved_task("README.md"),
        ),
        simple("9.64", 9, ["export", r, "--tasks", "a,a", "--out", "e"], (2,), ("run",), mention=(TWICE,)),
        simple(
            "9.65",
            9,
            ["export", r, "--tasks", "global,global", "--out", "e"],
            (2,),
            ("run",),
            mention=(TWICE,),
        ),
        simple("9.66", 9, ["export", r, "--tasks", ",", "--out", "e"], (2,), ("run",), note="--tasks empty"),
        simple("9.67", 9, ["export", r, "--format", "merged", "--out", "e"], (2,), ("run",), mention=("task",)),
        simple(
            "9.68",
            9,
            ["train", t, "--lr", "1e30", "--clip-norm", "0", "--steps", "6", "--out", "x"],
            (1,),
            after=status_is("x", "diverged"),
            note="exit-code contract: a diverged fit is 1, folder marked",
        ),
        simple("9.69", 9, ["frobnicate"], (2,), note="an unknown verb (argparse)"),
        simple("9.70", 9, ["evaluate", "{CSV}"], (2,), mention=("data.csv",), note="a file, not a run folder"),
        simple("9.71", 9, ["evaluate", "nowhere"], (2,), mention=("nowhere",)),
        Case(
            "9.72",
            9,
            show(["train", "{T}", "--steps", "300", "--out", "R"]) + "  # Ctrl-C (SIGINT) while it fits",
            "exit 130; says interrupted",
            signalled(signal.SIGINT, 130),
        ),
        Case(
            "9.73",
            9,
            show(["train", "{T}", "--steps", "300", "--out", "R"]) + "  # SIGTERM while it fits",
            "exit 143 (128 + 15); says interrupted",
            signalled(signal.SIGTERM, 143),
        ),
    ]
    return cases


# --------------------------------------------------------------------------------- item 10: empty tasks


def ghost_rows(texts: Sequence[object]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda f: pd.concat([f, pd.DataFrame({"task": ["ghost"] * len(texts), "text": list(texts)})])


def ghost_jsonl(s: Scratch) -> None:
    lines = [json.dumps(row) for row in synthetic_rows(TASKS).to_dict(orient="records")]
    lines += [json.dumps({"task": "ghost", "text": None})] * 4
    (s / "ghost.jsonl").write_text("\n".join(lines) + "\n")


def item10() -> list[Case]:
    train = ["train", "{T}", "--data", "csv:ghost.csv", "--out", "x"]
    named = ("'ghost'|\"ghost\"|ghost",)
    return [
        simple(
            "10.01",
            10,
            train,
            (0, 2),
            (),
            write_rows("ghost.csv", ghost_rows(["", "", "", ""])),
            say=named,
            note="task ghost: every text empty; named in the output",
        ),
        simple(
            "10.02",
            10,
            train,
            (0, 2),
            (),
            write_rows("ghost.csv", ghost_rows(["   ", None, "\t", "\n"])),
            say=named,
            note="whitespace and missing texts",
        ),
        simple(
            "10.03",
            10,
            ["train", "{T}", "--data", "jsonl:ghost.jsonl", "--out", "x"],
            (0, 2),
            (),
            ghost_jsonl,
            say=named,
            note="JSONL, null texts",
        ),
        simple(
            "10.04",
            10,
            train,
            (0, 2),
            (),
            write_rows("ghost.csv", ghost_rows(["\u00a0", "\u3000", "\u2003"])),
            say=named,
            note="Unicode spaces only",
        ),
        simple(
            "10.05",
            10,
            train,
            (2,),
            (),
            write_rows("ghost.csv", lambda f: f.assign(text="  ")),
            note="every task empty: one line",
        ),
        simple(
            "10.06",
            10,
            ["evaluate", "{RUN}", "--data", "csv:ghost.csv"],
            (0, 2),
            ("run",),
            write_rows("ghost.csv", lambda f: f.assign(text=f.text.where(f.task != "c", ""))),
            say=("'c'|\"c\"",),
            note="--data where task c's texts are all empty: c named",
        ),
    ]


# ----------------------------------------------------------------------------- item 11: bounded memory


def big_corpus(sizes: dict[tuple[str, str], int], tasks: dict[str, int] | None = None) -> Callable[[Scratch], None]:
    """A prepare writing big.csv: the victims' tasks, with a one-line document of ``sizes[(task, split)]``
    bytes put where the split sends it."""

    def prepare(s: Scratch) -> None:
        frame = synthetic_rows(tasks or {"a": 12, "b": 10, "c": 10})
        for (task, split), size in sizes.items():
            rows = [r for r in split_rows(frame, split) if frame.task[r] == task]
            words = "the lord seide to his puple and thei wenten forth in to the lond "
            frame.loc[rows[0], "text"] = (words * (size // len(words) + 1))[:size]
        frame.to_csv(s / "big.csv", index=False)

    return prepare


def chunks_within(cap: int, tasks: int, splits: Sequence[str] = ("valid", "test")) -> Callable[[Path], list[str]]:
    """The run's metrics.json says at most ``cap`` chunks per task were scored in each of ``splits``
    (and, a check of the harness itself, that a long document was in each)."""

    def verify(folder: Path) -> list[str]:
        try:
            documents = json.loads((folder / "metrics.json").read_text())["documents"]
        except (OSError, ValueError, KeyError) as err:
            return [f"no documents in {folder.name}/metrics.json ({err})"]
        problems = []
        for split in splits:
            d = documents.get(split, {})
            scored = d.get("chunks", d.get("used"))
            if scored is None or scored > cap * tasks:
                problems.append(f"{split}: {scored} chunks scored, more than {cap} per task x {tasks} tasks")
            if not d.get("long"):
                problems.append(f"harness: no long document landed in {split}")
        return problems

    return verify


def memory_case(
    argv: list[str], limit_s: float, verify: Callable[[Path], list[str]] | None = None, out: str = "x"
) -> Callable[[Scratch], Observed]:
    """Run ``argv`` in a subprocess measuring its peak RSS: exit 0 within ``limit_s`` s, at most
    :data:`RSS_MARGIN_MB` above a tiny run's peak, and ``verify``'s checks of the folder ``out``."""

    def fn(s: Scratch) -> Observed:
        res, peak, seconds, killed = measured(expand(argv), s.path, timeout=max(limit_s * 3, 120))
        problems = check(res, (0,))
        if killed:
            problems.append(killed)
        bound = (BASELINE.get("rss_mb") or 1000.0) + RSS_MARGIN_MB
        if peak is None or peak > bound:
            problems.append(f"peak RSS {peak or 0:.0f} MB, bound {bound:.0f} MB (a tiny run's + {RSS_MARGIN_MB})")
        if seconds > limit_s:
            problems.append(f"took {seconds:.0f} s, bound {limit_s:.0f} s")
        if verify is not None and res.code == 0:
            problems += verify(s / out)
        return Observed(f"{res.code} ({peak or 0:.0f} MB, {seconds:.0f} s)", res.line, problems)

    return fn


def item11() -> list[Case]:
    big = big_corpus({("b", "valid"): 3_000_000, ("c", "test"): 3_000_000})
    train = ["train", "{T}", "--data", "csv:big.csv", "--max-eval-docs", "4", "--out", "x"]
    truncated = ["train", "{T}", "--data", "csv:big.csv", "--long-documents", "truncate", "--out", "x"]
    small = big_corpus({("c", "test"): 60_000, ("b", "valid"): 60_000})
    bound = f"peak RSS <= a tiny run's + {RSS_MARGIN_MB} MB"
    return [
        Case(
            "11.01",
            11,
            show(train) + "  # 3 MB one-line documents in valid (b) and test (c)",
            f"exit 0; <= 4 scored chunks per task in valid and test; {bound}; < 120 s",
            memory_case(train, 120, chunks_within(4, 3)),
            prepare=big,
        ),
        Case(
            "11.02",
            11,
            show(["evaluate", "{RUN}", "--data", "csv:big.csv"]) + "  # 3 MB documents in valid, test",
            f"exit 0; {bound}; < 120 s",
            memory_case(["evaluate", "{RUN}", "--data", "csv:big.csv"], 120),
            ("run",),
            big_corpus({("b", "valid"): 3_000_000, ("c", "test"): 3_000_000}, TASKS),
        ),
        Case(
            "11.03",
            11,
            show(truncated) + "  # a 20 MB one-line document",
            f"exit 0; {bound}; < 90 s",
            memory_case(truncated, 90),
            prepare=big_corpus({("c", "train"): 20_000_000}),
        ),
        simple(
            "11.04",
            11,
            ["train", "{T}", "--data", "csv:big.csv", "--max-eval-docs", "2", "--out", "x"],
            (0,),
            (),
            small,
            after=lambda s, res: chunks_within(2, 3)(s / "x"),
            note="60 KB documents in valid and test: <= 2 scored chunks per task",
        ),
        simple(
            "11.05",
            11,
            ["train", "{T}", "--data", "csv:big.csv", "--max-eval-docs", "1", "--out", "x"],
            (0,),
            (),
            small,
            after=lambda s, res: chunks_within(1, 3)(s / "x"),
            note="<= 1 scored chunk per task",
        ),
    ]


# ------------------------------------------------------------------------------------------- the table


def all_cases() -> list[Case]:
    cases = item1() + item2() + item3() + item4() + item5() + item6() + item7() + item8() + item9()
    return cases + item10() + item11()


def cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def print_table(rows: list[Row], seconds: float) -> None:
    print("# Red team: issue 22's defect classes and their variants\n")
    print("    OMP_NUM_THREADS=1 .venv/bin/python experiments/red_team.py > experiments/results/red_team.md\n")
    print(
        f"`$T` = `{' '.join(T_ARGS)}`. Placeholders (RUN, RUNP, TRAINED, TWOSLOT, SWEEP, EXPORT, MERGED) are "
        "copies of victim folders built once at the start; every case runs in its own scratch folder (its "
        "working directory and $HOME). Checks: the exit code and error line, no traceback, every guarded "
        "entry byte-identical, nothing written outside the scratch folder.\n"
    )
    if SETUP:
        print("Victims that could not be built: " + "; ".join(f"{k}: {v}" for k, v in SETUP.items()) + "\n")
    print("| id | item | command | expected | observed (exit; last stderr line) | checks | as expected |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        checks = "ok" if row.ok else "; ".join(row.problems)
        observed = f"{row.observed.code}; `{cell(row.observed.line, 240)}`"
        print(
            f"| {row.case.id} | {row.case.item} | `{cell(row.case.command, 200)}` | {cell(row.case.expected)} | "
            f"{cell(observed, 320)} | {cell(checks, 400)} | {'yes' if row.ok else '**NO**'} |"
        )
    items = sorted({row.case.item for row in rows})
    print("\n| item | cases | as expected |\n|---|---|---|")
    for item in items:
        mine = [row for row in rows if row.case.item == item]
        print(f"| {item} | {len(mine)} | {sum(row.ok for row in mine)} |")
    good = sum(row.ok for row in rows)
    print(f"\ntotal time {seconds:.0f} s (peak RSS of a tiny run: {BASELINE.get('rss_mb', 0):.0f} MB)\n")
    print(f"{len(rows)} cases: {good} as expected, {len(rows) - good} not")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, metavar="ID,ID,...", help="run only the cases whose id starts so")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    init_layout()
    log = sys.__stderr__
    try:
        build_victims()
        print(f"victims built in {time.perf_counter() - started:.0f} s under {ROOT}", file=log, flush=True)
        rows = []
        wanted = None if args.only is None else tuple(args.only.split(","))
        for case in all_cases():
            if wanted is not None and not case.id.startswith(wanted):
                continue
            row = execute(case)
            rows.append(row)
            verdict = "ok" if row.ok else "NOT: " + "; ".join(row.problems)[:200]
            print(f"{case.id:>6} {row.seconds:5.1f}s {verdict}", file=log, flush=True)
        print_table(rows, time.perf_counter() - started)
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
