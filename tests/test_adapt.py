"""`adapt`: new tasks fitted under a run's learned prior, Theta held fixed."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from bora_pyro.cli import main

from .conftest import synthetic_rows, train_args


def test_adapt_new_tasks_keeps_theta_and_writes_a_run(tmp_path, capsys):
    rows = synthetic_rows({"a": 12, "b": 8, "new": 6}, seed=1)
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    rows[rows.task != "new"].to_csv(old, index=False)
    rows[rows.task == "new"].to_csv(new, index=False)
    source, adapted = tmp_path / "run", tmp_path / "adapted"
    assert main(train_args(old, source, "--tau", "10", "--steps", "8", "--lr", "0.05", "--eval-every", "4")) == 0
    assert (
        main(["adapt", str(source), "--data", f"csv:{new}", "--steps", "6", "--no-progress", "--out", str(adapted)])
        == 0
    )
    before, after = load_file(source / "adapters.safetensors"), load_file(adapted / "adapters.safetensors")
    for name in [k for k in before if k.startswith("global.")]:
        assert torch.equal(before[name], after[name])  # Theta did not move
    assert after["task.layers.0.self_attn.q_proj.B"].shape[0] == 1  # one new task
    metrics = json.loads((adapted / "metrics.json").read_text())
    assert metrics["test_ppl"] < metrics["base_test_ppl"] and metrics["tau"] == 10.0
    assert json.loads((adapted / "config.json").read_text())["adapted_from"] == str(source)
    capsys.readouterr()
    assert main(["evaluate", str(adapted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_task"][0]["task"] == "new"


def test_adapt_needs_a_finite_tau(tmp_path, capsys):
    data = tmp_path / "c.csv"
    synthetic_rows({"a": 6, "b": 5}).to_csv(data, index=False)
    assert main(train_args(data, tmp_path / "r", "--tau", "0", "--steps", "2", "--eval-every", "2")) == 0
    assert main(["adapt", str(tmp_path / "r"), "--data", f"csv:{data}", "--out", str(tmp_path / "a")]) == 2
    assert "fixed, finite tau > 0" in capsys.readouterr().err
