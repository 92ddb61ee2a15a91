"""Checkpoints and resumption: a run killed at any moment (SIGKILL, also inside a checkpoint save or
the run folder's write) and resumed ends exactly where an uninterrupted run ends; stale checkpoints
are never resumed by accident; a changed corpus or setting is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bora_pyro.cli import main
from bora_pyro.inference.checkpoint import LoopState, checkpoint_step, load_checkpoint, save_checkpoint
from bora_pyro.io.faults import CRASH_ENV

from .conftest import synthetic_rows, train_args

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


def test_checkpoint_slots_keep_the_newest_complete_one(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (4, 8):
        save_checkpoint(folder, None, LoopState(step=step), {}, {"run": 1})
    assert checkpoint_step(folder) == 8 and len(list(folder.glob("step-*"))) == 1
    (folder / ".tmp-step-00000012-dead").mkdir()  # a save killed half-way
    state, _ = load_checkpoint(folder, None, {"run": 1})
    assert state.step == 8 and not list(folder.glob(".tmp-*"))
    with pytest.raises(ValueError, match="belongs to a different run: run differs"):
        load_checkpoint(folder, None, {"run": 2})
    (slot,) = folder.glob("step-*")
    raw = bytearray((slot / "state.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (slot / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted: state.safetensors does not match its checksum"):
        load_checkpoint(folder, None, {"run": 1})


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
