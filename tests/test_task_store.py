"""Per-task tables in memory or in memory-mapped files: the same fit either way, files that read as
safetensors, and memory that does not grow with the number of tasks."""

from __future__ import annotations

import pyro
import pytest
import torch
from safetensors import safe_open

import bora_pyro
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.io.task_store import TaskStore, open_table


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
    assert torch.equal(open_table(path)[7], table[7])  # reopened: the same values
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
