"""Data-parallel training: 2 gloo processes under torchrun end with the parameters of one process
trained on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bora_pyro.cli import main
from bora_pyro.distributed import World

from .conftest import synthetic_rows, train_args


def dp_args(data, out, *extra):
    return train_args(data, out, "--batch-size", "4", "--lr", "0.02", "--posterior-samples", "2", *extra)


# VI: the shards' float sums of Theta's near-zero gradients differ in rounding; Adam's first steps
# (|g| ~ eps) amplify that to ~1e-5 (with task subsampling; 1e-7 without), hence 2e-4 after 6 steps.
@pytest.mark.parametrize(
    "extra,atol", [(("--tau", "10"), 1e-5), (("--tau", "learn", "--inference", "vi"), 2e-4)], ids=["map", "vi"]
)
def test_two_gloo_processes_equal_one_process(tmp_path, extra, atol):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    assert main(dp_args(data, tmp_path / "single", *extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "bora_pyro.cli",
            *dp_args(data, tmp_path / "ddp", *extra),
            "--distributed",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    single, ddp = (load_file(str(tmp_path / k / "adapters.safetensors")) for k in ("single", "ddp"))
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=atol, rtol=0)
    m1, m2 = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("single", "ddp"))
    assert m2["processes"] == 2 and m2["train_tokens"] == m1["train_tokens"]
    assert m2["valid_ppl"] == pytest.approx(m1["valid_ppl"], rel=1e-5)
    assert m2["test_ppl"] == pytest.approx(m1["test_ppl"], rel=1e-5)


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="batch_size 5 must be a multiple of the number of processes \\(2\\)"):
        World(rank=0, size=2).check_batch_size(5)
    assert World(rank=1, size=2).shard([7, 8, 9, 10]) == [9, 10]


def test_distributed_without_a_launcher_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--model", "tiny-random-llama", "--distributed", "--out", str(tmp_path / "r")]) != 0
    assert "--distributed needs a launcher: run under 'torchrun" in capsys.readouterr().err
