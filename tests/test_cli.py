"""The bora-pyro command line: a tiny end-to-end run, its run folder, evaluation, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bora_pyro.cli import main

from .conftest import synthetic_rows, train_args

OPTIONS = ["--eval-every", "5", "--posterior-samples", "8"]  # 8: the CLI default


@pytest.fixture
def corpus_csv(tmp_path):
    path = tmp_path / "corpus.csv"
    synthetic_rows({"north": 14, "south": 8, "east": 4}).to_csv(path, index=False)
    return path


def test_train_writes_the_run_folder_and_evaluate_reproduces_it(tmp_path, corpus_csv, capsys):
    run = tmp_path / "run"
    assert main(train_args(corpus_csv, run, *OPTIONS, "--tau", "100", "--steps", "10")) == 0
    for name in (
        "config.json",
        "metrics.json",
        "per_task.csv",
        "adapters.safetensors",
        "train_log.csv",
        "training_curve.png",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["mode"] == "hierarchical"
    assert metrics["test_ppl"] < metrics["base_test_ppl"]  # 10 steps on 26 docs already help a random model
    per_task = pd.read_csv(run / "per_task.csv")
    assert list(per_task.columns[:8]) == [
        "task",
        "n_train_docs",
        "n_train_tokens",
        "n_test_docs",
        "n_test_tokens",
        "test_ppl",
        "valid_ppl",
        "base_test_ppl",
    ]
    assert per_task.task.tolist() == ["north", "south", "east"]
    tensors = load_file(run / "adapters.safetensors")
    assert tensors["task.layers.0.self_attn.q_proj.A"].shape == (3, 8, 32)
    assert "global.layers.0.self_attn.q_proj.A" in tensors
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["token_weighted_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    assert [r["perplexity"] for r in report["per_task"]] == pytest.approx(per_task.test_ppl.tolist(), rel=1e-5)


def test_pooled_and_independent_runs(tmp_path, corpus_csv):
    for tau in ("inf", "0"):
        run = tmp_path / f"run{tau}"
        assert main(train_args(corpus_csv, run, *OPTIONS, "--tau", tau, "--steps", "3")) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["mode"] == {"inf": "pooled", "0": "independent"}[tau]
        distance = pd.read_csv(run / "per_task.csv").distance_to_global
        assert (distance == 0).all() if tau == "inf" else distance.isna().all()
    assert json.loads((tmp_path / "runinf" / "config.json").read_text())["prior"]["tau"] == "inf"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
        (["--data", "nonsense"], "unknown corpus 'nonsense'"),
        (["--tau", "-3"], "tau must be 0, a number in [1e-30, 1e+30], 'inf' or 'learn'"),
        (["--rank", "0"], "rank must be an integer >= 1, got 0"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(tmp_path, corpus_csv, capsys, args, message):
    run = tmp_path / "run"
    assert main(train_args(corpus_csv, run, *args)) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.csv"]  # no half-written temporary folder either


def test_existing_run_folder_is_not_overwritten(tmp_path, corpus_csv, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert main(train_args(corpus_csv, run, *OPTIONS, "--steps", "1")) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"


def test_evaluate_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_a_bfloat16_base_is_recorded_and_every_verb_reloads_it(tmp_path, corpus_csv, capsys):
    """--dtype bfloat16: the frozen base in bf16, the adapters float32; evaluate and load_run use bf16 again."""
    from bora_pyro.runs.load import load_run

    run = tmp_path / "run"
    assert main(train_args(corpus_csv, run, "--dtype", "bfloat16", "--curvature-docs", "0")) == 0
    assert json.loads((run / "config.json").read_text())["dtype"] == "bfloat16"
    metrics = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_weighted_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    loaded = load_run(run)
    assert {p.dtype for p in loaded.bora.lora.lm.parameters()} == {torch.bfloat16}
    assert {v.dtype for v in load_file(run / "adapters.safetensors").values()} == {torch.float32}
    full = tmp_path / "full"
    assert main(train_args(corpus_csv, full, "--curvature-docs", "0")) == 0
    reference = json.loads((full / "metrics.json").read_text())["test_ppl"]
    assert metrics["test_ppl"] == pytest.approx(reference, rel=0.02)  # bf16 rounding, not a different model


def test_an_unknown_dtype_is_refused_in_one_line(tmp_path, corpus_csv, capsys):
    assert main(train_args(corpus_csv, tmp_path / "run", "--dtype", "int8")) == 2
    assert "dtype" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("inference", ["map", "vi"])
def test_report_to_tensorboard_writes_the_named_scalars(tmp_path, corpus_csv, inference):
    """The event files, read back with TensorBoard's own reader, hold the log's numbers under their tags."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    options = ["--report-to", "tensorboard", "--curvature-docs", "0", "--inference", inference]
    if inference == "vi":
        options += ["--tau", "learn"]
    assert main(train_args(corpus_csv, run, *options)) == 0
    events = event_accumulator.EventAccumulator(str(tmp_path / "run.tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/nll_per_token", "train/perplexity", "train/prior_per_token", "train/grad_norm"}
    expected |= {"train/learning_rate", "eval/perplexity"}
    if inference == "vi":
        expected |= {"train/elbo_per_token", "tau/all"}
    assert expected <= tags
    log = pd.read_csv(run / "train_log.csv")
    for tag, column in (("train/grad_norm", "grad_norm"), ("eval/perplexity", "valid_ppl")):
        logged = log.dropna(subset=[column])
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == logged.step.tolist()
        assert [s.value for s in scalars] == pytest.approx(logged[column].tolist(), rel=1e-6)


def test_report_to_tensorboard_without_the_package_is_refused_before_any_work(
    tmp_path, corpus_csv, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(train_args(corpus_csv, tmp_path / "run", "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'bora-pyro[tensorboard]'" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tensorboard").exists()
