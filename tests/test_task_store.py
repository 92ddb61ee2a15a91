"""Per-task tables in memory or in memory-mapped files: the same fit either way, files that read as
safetensors, and memory that does not grow with the number of tasks."""

from __future__ import annotations

import mmap

import pyro
import pytest
import torch
from safetensors import safe_open

import bora_pyro
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.io.task_store import TaskStore


def test_a_disk_table_is_a_sparse_safetensors_file_read_row_by_row(tmp_path):
    store = TaskStore("disk", tmp_path)
    table = store.table("guide.task.x", (5000, 4, 16), fill=None)
    table[7] = 2.5
    store.flush()
    path = store.path("guide.task.x")
    assert path.stat().st_blocks * 512 < 1_000_000 < path.stat().st_size  # untouched rows take no disk space
    with safe_open(str(path), framework="pt") as f:
        rows = f.get_slice("rows")
        assert rows.get_shape() == [5000, 4, 16]
        assert torch.equal(rows[7:8], torch.full((1, 4, 16), 2.5)) and not rows[8:9].any()
    reopened = TaskStore("disk", tmp_path, reopen=True).table("guide.task.x", (5000, 4, 16), fill=None)
    assert torch.equal(reopened[7], table[7])  # reopened: the same values
    filled = store.table("guide.task.y", (10, 3), fill=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(filled, torch.tensor([[1.0, 2.0, 3.0]] * 10))


@pytest.mark.parametrize("parameterization", ["noncentered", "centered"])
def test_a_fit_with_a_disk_store_equals_the_fit_in_memory(make_corpus, tmp_path, parameterization):
    corpus = make_corpus({"a": 10, "b": 6, "c": 5, "d": 4})
    fitted = {}
    for kind in ("memory", "disk"):
        pyro.clear_param_store()
        store = TaskStore(kind, tmp_path / "store" if kind == "disk" else None)
        bora = bora_pyro.BoRA(
            tiny_random_llama()[0],
            corpus.tasks,
            rank=2,
            alpha=4,
            task_store=store,
            prior=bora_pyro.PriorConfig(tau=10.0, parameterization=parameterization),
        )
        bora_pyro.fit(bora, corpus, steps=6, batch_size=3, eval_every=3, progress=False, lr=0.05)
        fitted[kind] = bora.task_factors()
        if kind == "disk":
            assert len(list((tmp_path / "store").glob("*.safetensors"))) == 4 * 2 * 3  # 4 layers' A, B; moments
    for name, value in fitted["memory"].items():
        torch.testing.assert_close(fitted["disk"][name], value, atol=1e-6, rtol=0)


def test_a_run_with_a_disk_store_writes_the_same_run_folder(tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import load_file

    from bora_pyro.cli import main
    from bora_pyro.runs import train as run_training

    from .conftest import synthetic_rows, train_args

    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 12, "south": 8, "east": 5}).to_csv(data, index=False)
    options = ["--lr", "0.01", "--posterior-samples", "8"]  # 8: the CLI default
    assert main(train_args(data, tmp_path / "memory", *options, "--task-store", "memory")) == 0
    assert main(train_args(data, tmp_path / "disk", *options, "--task-store", "disk")) == 0
    for name, value in load_file(tmp_path / "memory" / "adapters.safetensors").items():
        torch.testing.assert_close(
            load_file(tmp_path / "disk" / "adapters.safetensors")[name], value, atol=1e-6, rtol=0
        )
    assert not (tmp_path / "disk.store").exists() and not (tmp_path / "disk" / "task_store").exists()
    # a failure while scoring: the fitted task rows stay in the run folder, and evaluate completes it
    with monkeypatch.context() as patch:
        patch.setattr(run_training, "score_run", lambda *a, **k: (_ for _ in ()).throw(ValueError("simulated")))
        assert main(train_args(data, tmp_path / "failed", *options, "--task-store", "disk")) == 2
    assert len(list((tmp_path / "failed" / "task_store").glob("*.safetensors"))) == 24
    assert main(["evaluate", str(tmp_path / "failed")]) == 0
    expected = json.loads((tmp_path / "memory" / "metrics.json").read_text())["test_ppl"]
    assert json.loads((tmp_path / "failed" / "metrics.json").read_text())["test_ppl"] == pytest.approx(
        expected, rel=1e-6
    )
    assert not (tmp_path / "failed" / "task_store").exists()


@pytest.mark.parametrize(
    "crash_at",
    [
        "store.rows-journaled:5",  # the rows' old values logged, the rows not yet written
        "store.rows-written:7",  # a step half written back (the guide's rows, not yet their moments)
        "checkpoint.slot-written:2",  # the tables flushed for a checkpoint that is not in place yet
        "checkpoint.slot-renamed:2",  # a checkpoint in place, its undo log not yet started
    ],
)
def test_a_kill_during_a_row_write_back_resumes_to_the_same_result(tmp_path, crash_at):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from bora_pyro.cli import main
    from bora_pyro.io.faults import CRASH_ENV

    from .conftest import synthetic_rows, train_args

    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 12, "south": 8, "east": 5, "west": 4}).to_csv(data, index=False)
    options = ["--steps", "16", "--eval-every", "4", "--batch-size", "3", "--lr", "0.01", "--checkpoint-every", "3"]
    assert main(train_args(data, tmp_path / "straight", *options, "--task-store", "memory")) == 0
    env = {**os.environ, CRASH_ENV: crash_at}
    killed = subprocess.run(
        [sys.executable, "-m", "bora_pyro.cli", *train_args(data, tmp_path / "disk", *options, "--task-store", "disk")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    assert main(["train", "--resume", str(tmp_path / "disk")]) == 0
    for name, value in load_file(tmp_path / "straight" / "adapters.safetensors").items():
        torch.testing.assert_close(
            load_file(tmp_path / "disk" / "adapters.safetensors")[name], value, atol=1e-6, rtol=0
        )
    assert (tmp_path / "disk" / "train_log.csv").read_text() == (tmp_path / "straight" / "train_log.csv").read_text()


def test_tables_are_made_on_the_parameters_device_but_disk_tables_stay_in_host_memory(tmp_path):
    meta = torch.device("meta")  # stands for an accelerator: a tensor's device without its memory
    assert TaskStore("memory").table("guide.x", (3, 2), device=meta).device == meta
    assert TaskStore("disk", tmp_path / "store").table("guide.x", (3, 2), device=meta).device == torch.device("cpu")


def test_prefetch_asks_the_kernel_for_exactly_the_pages_of_the_next_steps_rows(tmp_path):
    store = TaskStore("disk", tmp_path)
    table = store.table("guide.task.x", (50, 3, 700))  # rows of 8,400 bytes: not page-aligned
    table.copy_(torch.randn(50, 3, 700))
    mapping = store._maps["guide.task.x"]

    class Recording:  # the map, with its madvise calls recorded
        def __init__(self, mapped):
            self.mapped, self.calls = mapped, []

        def madvise(self, option, start=0, length=None):
            self.calls.append((option, start, length))

    mapping.map = recording = Recording(mapping.map)
    store.prefetch(torch.tensor([4, 31]))
    store.prefetch(None)  # every task: nothing to read ahead
    assert len(recording.calls) == 2
    for row, (option, start, length) in zip((4, 31), recording.calls):
        assert option == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0
        data = recording.mapped[start : start + length]
        assert table[row].numpy().tobytes() in data and len(data) < table[row].nbytes + mmap.PAGESIZE
    recording.calls.clear()
    TaskStore("memory").prefetch(torch.tensor([1]))  # a memory store reads nothing
    assert not recording.calls


def test_data_parallel_processes_refuse_a_disk_store_they_would_all_write(tmp_path, monkeypatch):
    from bora_pyro.distributed import World
    from bora_pyro.models.adapter import AdapterConfig
    from bora_pyro.runs.build import task_store
    from bora_pyro.runs.spec import RunSpec

    spec = RunSpec(model="tiny-random-llama", adapter=AdapterConfig(task_store="disk"))
    assert task_store(spec, 4, 100, tmp_path / "store").disk
    monkeypatch.setattr(World, "current", classmethod(lambda cls: cls(rank=1, size=2)))
    with pytest.raises(ValueError, match=r"one of 2 data-parallel processes.*--task-store disk.*--task-store memory"):
        task_store(spec, 4, 100, tmp_path / "store")
    assert not task_store(spec, 4, 100, None).disk  # a loaded run (no folder) keeps no disk store anyway
    memory = RunSpec(model="tiny-random-llama", adapter=AdapterConfig(task_store="memory"))
    assert not task_store(memory, 4, 100, tmp_path / "store").disk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_disk_store_on_an_accelerator_fits_as_the_memory_store_on_it(make_corpus, tmp_path):
    corpus = make_corpus({"a": 10, "b": 6, "c": 5, "d": 4})
    fitted = {}
    for kind in ("memory", "disk"):
        pyro.clear_param_store()
        store = TaskStore(kind, tmp_path / "store" if kind == "disk" else None)
        lm = tiny_random_llama()[0].to("cuda")
        bora = bora_pyro.BoRA(lm, corpus.tasks, rank=2, alpha=4, task_store=store)
        bora_pyro.fit(bora, corpus, steps=6, batch_size=3, eval_every=3, progress=False, lr=0.05)
        fitted[kind] = bora.task_factors()
        assert all(v.device.type == "cuda" for v in fitted[kind].values())
    for name, value in fitted["memory"].items():
        torch.testing.assert_close(fitted["disk"][name], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau", ["0", "inf"])
def test_a_disk_store_runs_the_classical_extremes_as_the_memory_store(tmp_path, tau):
    """tau = inf (pooled) has no task rows at all, tau = 0 only task rows: both run with --task-store disk."""
    from safetensors.torch import load_file

    from bora_pyro.cli import main

    from .conftest import synthetic_rows, train_args

    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 12, "south": 8, "east": 5}).to_csv(data, index=False)
    for store in ("memory", "disk"):
        assert main(train_args(data, tmp_path / store, "--tau", tau, "--lr", "0.01", "--task-store", store)) == 0
    for name, value in load_file(tmp_path / "memory" / "adapters.safetensors").items():
        torch.testing.assert_close(
            load_file(tmp_path / "disk" / "adapters.safetensors")[name], value, atol=1e-6, rtol=0
        )
