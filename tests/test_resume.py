"""Checkpoints and resumption: a run killed at any moment (SIGKILL, also inside a checkpoint save or
the run folder's write) and resumed ends exactly where an uninterrupted run ends, from the older slot
if the newest is damaged; stale checkpoints are never resumed by accident; a changed corpus or setting
is named."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bora_pyro.cli import EXIT_CORRUPT, main
from bora_pyro.inference.checkpoint import LoopState, checkpoint_step, load_checkpoint, save_checkpoint
from bora_pyro.io.faults import CRASH_ENV
from bora_pyro.io.task_store import UndoLog

from .conftest import synthetic_rows, train_args
from .test_checkpoint_fallback import delete_state_json, drop_sha256, flip_a_byte

STEPS = 24


def resume_args(data, out, *extra):
    options = ["--steps", str(STEPS), "--batch-size", "4", "--eval-every", "8", "--checkpoint-every", "4"]
    return train_args(data, out, *options, "--lr", "0.01", *extra)


def run_cli(args, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "bora_pyro.cli", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The corpus and an uninterrupted run on it."""
    folder = tmp_path_factory.mktemp("straight")
    data = folder / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    assert main(resume_args(data, folder / "run")) == 0
    return data, folder / "run"


def assert_same_run(run, reference):
    a, b = load_file(run / "adapters.safetensors"), load_file(reference / "adapters.safetensors")
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert (run / "train_log.csv").read_text() == (reference / "train_log.csv").read_text()
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    assert not (run.parent / f"{run.name}.checkpoint").exists()  # removed once the run is complete


@pytest.mark.parametrize(
    "crash_at",
    [
        "checkpoint.tensors-written:3",  # inside the third save, before its metadata
        "checkpoint.slot-written:4",  # a complete new slot, not yet renamed into place
        "checkpoint.slot-renamed:2",  # two complete slots on disk, the old one not yet deleted
        "folder.renamed-in:1",  # the run folder in place, the checkpoint not yet removed
        "run.fitted:1",  # the fitted state written, scoring not started
    ],
)
def test_killed_at_a_crash_point_then_resumed_equals_an_uninterrupted_run(tmp_path, straight, crash_at):
    data, reference = straight
    killed = tmp_path / "killed"
    proc = run_cli(resume_args(data, killed), crash_at)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    resumed = run_cli(["train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(killed, reference)


def test_a_fresh_run_never_resumes_an_earlier_checkpoint(tmp_path, straight):
    data, reference = straight
    run = tmp_path / "run"
    assert run_cli(resume_args(data, run), "checkpoint.slot-renamed:3").returncode == -9
    again = run_cli(resume_args(data, run))
    assert again.returncode == 2
    assert f"holds a checkpoint at step 12 of an earlier run of '{run}'" in again.stderr
    assert "--resume" in again.stderr and "Traceback" not in again.stderr
    assert run_cli(resume_args(data, run, "--overwrite")).returncode == 0  # --overwrite discards it
    assert_same_run(run, reference)


def test_resume_refuses_changed_data_naming_what_changed(tmp_path, straight):
    data, _ = straight
    mine = tmp_path / "corpus.csv"
    mine.write_text(data.read_text())
    run = tmp_path / "run"
    assert run_cli(resume_args(mine, run), "checkpoint.slot-renamed:2").returncode == -9
    mine.write_text(mine.read_text().replace("lord", "lady"))
    resumed = run_cli(["train", "--resume", str(run)])
    assert resumed.returncode == 2
    assert "corpus_sha256 changed since it was started" in resumed.stderr


def test_checkpoint_slots_keep_the_two_newest_complete_ones(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (4, 8, 12):
        save_checkpoint(folder, None, LoopState(step=step), {}, {"run": 1})
    assert checkpoint_step(folder) == 12 and len(list(folder.glob("step-*"))) == 2
    (folder / ".tmp-step-00000016-dead").mkdir()  # a save killed half-way
    state, _ = load_checkpoint(folder, None, {"run": 1})
    assert state.step == 12 and not list(folder.glob(".tmp-*"))
    with pytest.raises(ValueError, match="belongs to a different run: run differs"):
        load_checkpoint(folder, None, {"run": 2})


def killed_with_two_slots(data, run, store: str) -> tuple:
    """A run (task store ``store``, a checkpoint every step) killed inside its sixth save: slots at steps 5
    and 4, newest first."""
    args = resume_args(data, run, "--task-store", store, "--checkpoint-every", "1")
    proc = run_cli(args, "checkpoint.tensors-written:6")
    assert proc.returncode == -9, proc.stderr
    slots = sorted((run.parent / f"{run.name}.checkpoint").glob("step-*"), reverse=True)
    assert [s.name[: len("step-00000005")] for s in slots] == ["step-00000005", "step-00000004"]
    return tuple(slots)


def rows_logged(log) -> set:
    return {(name, row) for name, row, _ in UndoLog.entries(log)}


@pytest.mark.parametrize("damage", [flip_a_byte, delete_state_json, drop_sha256])
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_damaged_newest_slot_resumes_from_the_older_one_to_the_uninterrupted_result(
    tmp_path, straight, caplog, store, damage
):
    data, reference = straight
    run = tmp_path / "run"
    newest, older = killed_with_two_slots(data, run, store)
    if store == "disk":  # back to step 4 takes both logs: step 6 (flushed) wrote rows that step 5 did not
        logs = [run.parent / f"{run.name}.store" / f"undo-{g}.log" for g in (4, 5)]
        assert rows_logged(logs[1]) - rows_logged(logs[0])
    why = damage(newest)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(run)]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert str(newest) in warning and why in warning and f"older slot {older.name} at step 4 instead" in warning
    assert_same_run(run, reference)


def test_no_intact_checkpoint_slot_is_one_clear_error(tmp_path, straight, capsys):
    data, _ = straight
    run = tmp_path / "run"
    newest, older = killed_with_two_slots(data, run, "memory")
    whys = [delete_state_json(newest), flip_a_byte(older)]
    assert main(["train", "--resume", str(run)]) == EXIT_CORRUPT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"no intact checkpoint in {newest.parent}" in line
    assert f"{newest.name}: {whys[0]}" in line and f"{older.name}: {whys[1]}" in line
    assert newest.exists() and older.exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
