"""What ``--overwrite`` may replace, symbolic links, and readers that never clean up after a writer.

A command replaces only a folder of its own kind that holds nothing the tool did not write; the source
of a command is never its target; anything else is refused with the reason and left byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bora_pyro.cli import main
from bora_pyro.io.folders import MARKER, folder_kind, folder_lock, foreign_entries, reading

from .conftest import held_by_another_process, synthetic_rows, train_args


def digest(folder: Path) -> str:
    """The names and bytes of every file under ``folder``: equal digests = nothing changed."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A trained run, its export, a sweep and a checkpoint folder, built once (copied by each test)."""
    root = tmp_path_factory.mktemp("built")
    data = root / "corpus.csv"
    synthetic_rows({"north": 14, "south": 8, "east": 4}).to_csv(data, index=False)
    assert main(train_args(data, root / "run", "--steps", "2", "--eval-every", "2")) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    sweep = ["sweep", "--model", "tiny-random-llama", "--data", f"csv:{data}", "--steps", "2", "--eval-every", "2"]
    assert main([*sweep, "--no-progress", "--posterior-samples", "0", "--taus", "0", "--out", str(root / "sweep")]) == 0
    checkpointed = [*train_args(data, root / "ck", "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2")]
    env = {**os.environ, "BORA_PYRO_CRASH_AT": "checkpoint.slot-renamed:2", "OMP_NUM_THREADS": "1"}
    code = f"import sys; from bora_pyro.cli import main; sys.exit(main({checkpointed!r}))"
    subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert (root / "ck.checkpoint").is_dir()
    return root


@pytest.fixture
def place(built, tmp_path):
    """Copies of the built folders in this test's own folder."""
    for name in ("run", "export", "sweep", "ck.checkpoint", "corpus.csv"):
        src = built / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(
    "command, victim",
    [
        (["export", "{run}", "--out", "{run}", "--overwrite"], "run"),
        (["export", "{run}", "--out", "{ck}", "--overwrite"], "ck.checkpoint"),
        (["export", "{run}", "--out", "{sweep}", "--overwrite"], "sweep"),
        (["export", "{run}", "--out", "{run}/inside", "--overwrite"], "run"),
        (["export", "{run}", "--format", "merged", "--task", "north", "--out", "{export}", "--overwrite"], "export"),
        (["adapt", "{run}", "--data", "csv:{csv}", "--out", "{run}", "--overwrite"], "run"),
        (["train", "--out", "{sweep}", "--overwrite"], "sweep"),
        (["train", "--out", "{export}", "--overwrite"], "export"),
        (["sweep", "--taus", "0", "--out", "{run}"], "run"),
        (["sweep", "--taus", "0", "--out", "{export}"], "export"),
    ],
)
def test_overwrite_replaces_only_a_folder_of_its_own_kind(place, capsys, command, victim):
    names = {"run": "run", "export": "export", "sweep": "sweep", "ck": "ck.checkpoint", "csv": "corpus.csv"}
    args = [a.format(**{k: place / v for k, v in names.items()}) for a in command]
    if args[0] in ("train", "sweep"):
        base = train_args(place / "corpus.csv", "X")
        args = [args[0], *base[1 : base.index("--out")], *args[1:]]
    before = digest(place / victim)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err
    assert digest(place / victim) == before


@pytest.mark.parametrize("where", ["top", "nested"])
def test_overwrite_refuses_a_folder_holding_a_users_file(place, capsys, where):
    run = place / "run"
    added = run / "my_notes.txt" if where == "top" else place / "export" / "north" / "notes.txt"
    added.write_text("mine")
    target = run if where == "top" else place / "export"
    before = digest(target)
    if where == "top":
        code = main(train_args(place / "corpus.csv", run, "--steps", "2", "--overwrite"))
    else:
        code = main(["export", str(run), "--out", str(target), "--overwrite"])
    assert code == 2
    assert "did not write" in capsys.readouterr().err
    assert digest(target) == before and added.read_text() == "mine"


def test_overwrite_replaces_a_pure_folder_of_its_kind(place):
    assert foreign_entries(place / "export") == []
    assert main(["export", str(place / "run"), "--out", str(place / "export"), "--overwrite"]) == 0
    assert folder_kind(place / "export") == "export"


def test_a_marker_that_claims_another_kind_is_refused(place, capsys):
    (place / "run" / MARKER).write_text('{"kind": "export"}')
    before = digest(place / "run")
    assert main(train_args(place / "corpus.csv", place / "run", "--steps", "2", "--overwrite")) == 2
    assert "is an export folder" in capsys.readouterr().err
    assert digest(place / "run") == before


@pytest.mark.parametrize("link_to", ["empty", "run", "dangling"])
def test_a_symlinked_out_is_written_through_or_refused(place, capsys, link_to):
    target = {"empty": place / "empty", "run": place / "run", "dangling": place / "nowhere"}[link_to]
    if link_to == "empty":
        target.mkdir()
    link = place / "link"
    link.symlink_to(target)
    code = main(train_args(place / "corpus.csv", link, "--steps", "2", "--overwrite"))
    leftovers = [p.name for p in place.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    assert leftovers == []
    assert link.is_symlink()  # the link itself is never replaced
    if link_to == "dangling":
        assert code == 2
        assert "does not exist" in capsys.readouterr().err
    else:
        assert code == 0
        assert folder_kind(target) == "run" and (target / "adapters.safetensors").is_file()


def test_a_reader_never_cleans_up_a_writers_temporaries(place):
    run = place / "run"
    tmp = place / f".run.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / "half-written").write_text("x")
    with held_by_another_process(run):
        with reading(run) as path:  # another process writes it: only read
            assert path == run.resolve()
        assert tmp.is_dir()
        assert main(["evaluate", str(run)]) == 0
        assert tmp.is_dir()
    with reading(run):  # the writer is gone: its leftovers are cleaned up
        pass
    assert not tmp.exists()


def test_every_verb_recovers_an_interrupted_replacement(place, capsys):
    run = place / "run"
    before = digest(run)
    env = {**os.environ, "BORA_PYRO_CRASH_AT": "folder.renamed-aside:1", "OMP_NUM_THREADS": "1"}
    args = train_args(place / "corpus.csv", run, "--steps", "2", "--overwrite", "--seed", "3")
    subprocess.run(
        [sys.executable, "-c", f"import sys; from bora_pyro.cli import main; sys.exit(main({args!r}))"],
        env=env,
        check=False,
    )
    assert not run.exists()  # renamed aside, the new one not yet in place
    assert main(["evaluate", str(run)]) == 0
    assert digest(run) == before
    assert not list(place.glob(".run.*"))


def test_a_locked_folder_gets_its_own_exit_code(place, capsys):
    args = train_args(place / "corpus.csv", place / "run", "--overwrite")
    with folder_lock(place / "run"):
        script = f"import sys; from bora_pyro.cli import main; sys.exit(main({args!r}))"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 75
    assert "another bora_pyro process" in done.stderr
