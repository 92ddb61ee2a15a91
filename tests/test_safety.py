"""Runs that never lose a user's work, never run code from a file and never change data silently:
overwrite only what the tool wrote, the two-stage run folder, locks, signals, divergence, the base
model's identity, scored-document counts and the training-loss breakdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.io import base_models
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.io.folders import MARKER
from bora_pyro.runs import RunSpec
from bora_pyro.runs import train as run_training

from .conftest import edit_run_file, held_by_another_process, synthetic_rows, train_args


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "corpus.csv"
    synthetic_rows({"north": 14, "south": 8, "east": 4}).to_csv(path, index=False)
    return path


def train(data, out, *extra) -> int:
    return main(train_args(data, out, *extra))


# 1. trust_remote_code is never taken from a file


@pytest.mark.parametrize(
    "command", [["evaluate"], ["generate", "--task", "north", "--prompt", "the"], ["export", "--out", "EXPORT"]]
)
def test_a_run_folder_cannot_grant_trust_remote_code(tmp_path, data, capsys, command):
    run = tmp_path / "run"
    assert train(data, run) == 0
    edit_run_file(run / "config.json", trust_remote_code=True)
    args = [a.replace("EXPORT", str(tmp_path / "export")) for a in command]
    capsys.readouterr()
    assert main([args[0], str(run), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "never takes that permission from a file: pass --trust-remote-code yourself" in err
    assert not (tmp_path / "export").exists()
    assert main([args[0], str(run), *args[1:], "--trust-remote-code"]) == 0  # the user's own permission


def test_resume_cannot_take_trust_remote_code_from_the_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    folder = tmp_path / "run.checkpoint"
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    (folder / "spec.json").write_text(
        json.dumps({**RunSpec(model="tiny-random-llama").to_dict(), "trust_remote_code": True})
    )
    assert main(["train", "--resume", str(run)]) == 2
    assert "never takes that permission from a file" in capsys.readouterr().err


# 3. --overwrite replaces only what bora_pyro wrote, never the working directory or home


def test_overwrite_refuses_a_folder_the_tool_did_not_write(tmp_path, data, capsys):
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert train(data, mine, "--overwrite") == 2
    assert "--overwrite replaces only folders that bora_pyro wrote" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("where", ["cwd", "home", "parent"])
def test_overwrite_never_touches_the_working_directory_or_home(tmp_path, data, capsys, monkeypatch, where):
    cwd = tmp_path / "project" / "work"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(cwd))
    target = {"cwd": ".", "home": str(cwd), "parent": ".."}[where]
    assert train(data, target, "--overwrite") == 2
    assert "refusing to write the run folder" in capsys.readouterr().err
    assert (cwd / "notes.txt").read_text() == "keep"


def test_overwrite_replaces_a_run_and_a_crash_mid_replacement_keeps_the_old_one(tmp_path, data):
    run = tmp_path / "run"
    assert train(data, run) == 0
    old = load_file(run / "adapters.safetensors")
    env = {**os.environ, "BORA_PYRO_CRASH_AT": "folder.renamed-aside:1"}
    args = train_args(data, run, "--steps", "4", "--eval-every", "2", "--overwrite")
    assert subprocess.run([sys.executable, "-m", "bora_pyro.cli", *args], env=env).returncode == -9
    assert not run.exists()  # killed between renaming the old folder aside and the new one in
    loaded = bora_pyro.load_run(run)  # reading recovers the old, complete folder
    assert loaded.status == "complete"
    assert torch.equal(
        load_file(run / "adapters.safetensors")["task.layers.0.self_attn.q_proj.A"],
        old["task.layers.0.self_attn.q_proj.A"],
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no leftovers
    assert subprocess.run([sys.executable, "-m", "bora_pyro.cli", *args]).returncode == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4  # replaced by the new run


# 4. the fit is written before scoring, and evaluate completes a run whose scoring failed


def test_a_failure_after_the_fit_loses_nothing_and_evaluate_completes_the_run(tmp_path, data, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert train(data, straight) == 0
    failing = tmp_path / "failing"

    def out_of_memory(*args, **kwargs):
        raise ValueError("simulated: out of memory while scoring")

    with monkeypatch.context() as patch:
        patch.setattr(run_training, "score_run", out_of_memory)
        assert train(data, failing) == 2
    assert json.loads((failing / "status.json").read_text())["status"] == "trained"
    assert (failing / "adapters.safetensors").is_file() and (failing / "fit_state.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(failing), "--json"]) == 0
    assert "scoring it now" in capsys.readouterr().err
    assert json.loads((failing / "status.json").read_text())["status"] == "complete"
    assert not (failing / "fit_state.safetensors").exists()
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (failing, straight))
    assert a["test_ppl"] == pytest.approx(b["test_ppl"], rel=1e-6)
    assert pd.read_csv(failing / "per_task.csv").equals(pd.read_csv(straight / "per_task.csv"))


# 7. one writer per folder; one converter of the cached model


def test_a_folder_being_written_by_another_process_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    with held_by_another_process(run):
        assert train(data, run) == 75
    assert "is being written by another bora_pyro process" in capsys.readouterr().err
    assert not run.exists()


def test_concurrent_first_loads_convert_the_embedded_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_PYRO_CACHE", str(tmp_path))
    calls = []

    def slow_convert(target: Path) -> None:
        calls.append(target)
        time.sleep(0.5)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(base_models, "_convert_smollm2", slow_convert)
    found = []
    threads = [threading.Thread(target=lambda: found.append(base_models._cached_smollm2())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and found == [tmp_path / "smollm2-135m"] * 3


# 8. SIGTERM / Ctrl-C: checkpoint, one line, non-zero status, folder marked interrupted


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_the_run_resumes_to_the_same_end(tmp_path, data, signum):
    options = ["--steps", "40", "--eval-every", "5", "--checkpoint-every", "10", "--batch-size", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bora_pyro.cli", *train_args(data, tmp_path / "run", *options)],
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoint = tmp_path / "run.checkpoint"
    deadline = time.time() + 120
    while not list(checkpoint.glob("step-*")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    err = proc.communicate()[1]
    assert proc.returncode == 128 + signum
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"bora-pyro train: interrupted by {signal.Signals(signum).name} after step")
    assert "--resume" in last
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] < 40
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert main(train_args(data, tmp_path / "straight", *options)) == 0
    for name, value in load_file(tmp_path / "straight" / "adapters.safetensors").items():
        torch.testing.assert_close(load_file(tmp_path / "run" / "adapters.safetensors")[name], value, atol=1e-6, rtol=0)
    assert (tmp_path / "run" / "train_log.csv").read_text() == (tmp_path / "straight" / "train_log.csv").read_text()


# 9. a non-finite loss or gradient stops the fit before the update


def poisoned_likelihood(bad_from: int, kind: str):
    """An LM likelihood that turns non-finite (value, or gradient only) from its ``bad_from``-th call with
    gradients on (calls 1-2 set the guide up, call k + 2 is step k; validation runs without gradients)."""
    calls = {"n": 0}
    original = bora_pyro.models.bora.lm_log_likelihood

    def loglik(lora, factors, batch, gates=None):
        out = original(lora, factors, batch, gates)
        if not torch.is_grad_enabled():
            return out
        calls["n"] += 1
        if calls["n"] < bad_from:
            return out
        if kind == "loss":
            return out * float("nan")
        x = next(iter(factors.values())).sum()
        return out + torch.where(
            torch.tensor(True), torch.zeros(()), torch.sqrt(-1 - x**2)
        )  # finite value, NaN gradient

    return loglik


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_not_applied_and_the_run_is_marked_diverged(tmp_path, data, capsys, monkeypatch, kind):
    monkeypatch.setattr(bora_pyro.models.bora, "lm_log_likelihood", poisoned_likelihood(6, kind))
    run = tmp_path / "run"
    assert main(train_args(data, run, "--steps", "20", "--eval-every", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"non-finite {'loss' if kind == 'loss' else 'gradient norm'}" in err and "not applied" in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "diverged" and (status["step"], status["best_step"]) == (3, 2)  # step 4 is bad
    adapters = load_file(run / "adapters.safetensors")
    assert all(torch.isfinite(v).all() for v in adapters.values())


def test_the_fit_api_reports_divergence_and_keeps_the_last_good_parameters(make_corpus, monkeypatch):
    corpus = make_corpus()
    monkeypatch.setattr(bora_pyro.models.bora, "lm_log_likelihood", poisoned_likelihood(4, "gradient"))
    bora = bora_pyro.BoRA(tiny_random_llama()[0], corpus.tasks, rank=2, alpha=4, tau=10.0)
    result = bora_pyro.fit(bora, corpus, steps=10, batch_size=4, eval_every=100, progress=False)
    assert result.status == "diverged" and result.state.step == 1  # call 4 is step 2
    assert all(torch.isfinite(v).all() for v in bora.task_factors().values())


# 13. the base model's identity: recorded, checked, and exported for PEFT


def test_the_run_records_its_base_model_and_refuses_other_weights(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert train(data, run) == 0
    config = json.loads((run / "config.json").read_text())
    recorded = config["base_model"]
    assert recorded["name"] == "tiny-random-llama"
    assert recorded["weights_sha256"] == base_models.weights_sha256(tiny_random_llama()[0])
    assert recorded["weights_sha256"] != base_models.weights_sha256(tiny_random_llama(seed=1)[0])
    edit_run_file(run / "config.json", base_model={**recorded, "weights_sha256": "0" * 64})
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    assert "was trained against other weights of 'tiny-random-llama'" in capsys.readouterr().err


def test_peft_export_names_a_base_model_a_user_can_load():
    info = base_models.describe_base_model("smollm2-135m", tiny_random_llama()[0])
    assert info["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "GGUF" in info["note"]
    assert (
        base_models.describe_base_model("some-org/some-model", tiny_random_llama()[0])["hub_id"]
        == "some-org/some-model"
    )


# 14. how many documents were scored, printed and recorded


def test_every_run_says_how_many_held_out_documents_were_scored(tmp_path, capsys):
    data = tmp_path / "big.csv"
    synthetic_rows({"north": 40, "south": 30, "east": 20}).to_csv(data, index=False)
    run = tmp_path / "run"
    assert train(data, run, "--max-eval-docs", "1") == 0
    out = capsys.readouterr().out
    documents = json.loads((run / "metrics.json").read_text())["documents"]
    assert documents["test"]["used"] == 3 and documents["test"]["available"] > 3
    assert f"test: 3 of its {documents['test']['available']} held-out documents were scored" in out


# 15. the training log separates the data term from the prior


def test_the_training_log_separates_the_likelihood_from_the_prior(tmp_path, data):
    for tau, prior_is_zero in (("0", True), ("100", False)):
        run = tmp_path / f"tau{tau}"
        assert train(data, run, "--tau", tau) == 0
        log = pd.read_csv(run / "train_log.csv")
        assert {"train_nll_per_token", "train_ppl", "prior_per_token", "loss_per_token"} <= set(log.columns)
        assert (log.train_ppl - log.train_nll_per_token.map(lambda v: float(torch.tensor(v).exp()))).abs().max() < 1e-3
        assert ((log.prior_per_token.abs() < 1e-5).all()) == prior_is_zero  # float32 rounding of loss - data
        assert (log.train_nll_per_token > 0).all() and (
            log.train_nll_per_token < 10
        ).all()  # nats per token, not the joint
