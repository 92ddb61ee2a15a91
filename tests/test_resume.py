"""Checkpoints: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bora_pyro.cli import main
from bora_pyro.inference.checkpoint import load_checkpoint

from .conftest import synthetic_rows


def train_args(data, out):
    return ["train", "--model", "tiny-random-llama", "--data", f"csv:{data}", "--steps", "80", "--batch-size", "4",
            "--eval-every", "20", "--checkpoint-every", "4", "--lr", "0.01", "--posterior-samples", "0",
            "--no-progress", "--out", str(out)]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bora_pyro.cli", *train_args(data, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed.checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["loop"]["step"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before it could be killed; make it longer"
    interrupted_at = json.loads(state.read_text())["loop"]["step"]
    assert 20 <= interrupted_at < 80

    assert main(["train", "--resume", str(killed)]) == 0
    assert not (tmp_path / "killed.checkpoint").exists()  # cleaned up after success
    assert main(train_args(data, tmp_path / "straight")) == 0
    resumed, straight = load_file(killed / "adapters.safetensors"), load_file(tmp_path / "straight" / "adapters.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=0)
    log_a = (killed / "train_log.csv").read_text().splitlines()
    log_b = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()
    assert log_a == log_b and len(log_a) == 81


def test_corrupted_checkpoint_is_refused(tmp_path):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    from bora_pyro.inference.checkpoint import LoopState, save_checkpoint

    folder = tmp_path / "ckpt"
    save_checkpoint(folder, None, LoopState(step=3), {}, {"run": 1})
    with pytest.raises(ValueError, match="different run configuration"):
        load_checkpoint(folder, None, {"run": 2})
    raw = bytearray((folder / "state.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted: state.safetensors does not match its checksum"):
        load_checkpoint(folder, None, {"run": 1})
    (folder / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted: state.json is not valid JSON"):
        load_checkpoint(folder, None, {"run": 1})


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
