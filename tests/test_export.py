"""PEFT export: every task's adapter loads with peft.PeftModel and reproduces bora_pyro's logits."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bora_pyro.cli import main
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.io.export import MAX_FOLDER_NAME, export_peft, safe_names
from bora_pyro.nn.lora import MultiTaskLoRA
from bora_pyro.runs import load_run

from .conftest import synthetic_rows, train_args

peft = pytest.importorskip("peft")


def test_exported_adapters_give_the_same_logits_in_peft(tmp_path):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"North/Sør": 10, "east": 6, "west": 4}).to_csv(data, index=False)
    run, out = tmp_path / "run", tmp_path / "peft"
    assert main(train_args(data, run, "--lr", "0.05")) == 0
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    folders = json.loads((out / "tasks.json").read_text())
    assert folders == {"North/Sør": "North_S_r", "east": "east", "west": "west", "global": "global"}
    loaded = load_run(run, device="cpu")
    input_ids = torch.randint(0, 250, (2, 12))
    for d, task in enumerate(loaded.bora.tasks):
        factors = {k: v[d : d + 1] for k, v in loaded.task_factors.items()}
        with torch.no_grad(), loaded.bora.lora.activate(factors):
            ours = loaded.bora.lora.lm(input_ids=input_ids).logits
        model = peft.PeftModel.from_pretrained(tiny_random_llama()[0], out / folders[task]).eval()
        with torch.no_grad():
            theirs = model(input_ids=input_ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    base = tiny_random_llama()[0]
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=input_ids).logits, theirs, atol=1e-4)  # the adapter matters


def test_safe_names_are_unique_and_never_global():
    names = safe_names(["a b", "a_b", "global", "../x", ""])
    assert len(set(names.values())) == 5
    assert "global" not in names.values() and all("/" not in n and not n.startswith(".") for n in names.values())


def test_long_and_non_ascii_task_names_export_to_short_distinct_folders(tmp_path):
    tasks = ["x" * 300, "é" * 200, "y" * 299 + "a", "y" * 299 + "b", "task"]
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2)
    factors = {name: torch.zeros(len(tasks), *shape) for name, shape in lora.shapes().items()}
    folders = export_peft(lora, tasks, factors, None, "tiny-random-llama", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "tasks.json").read_text()) == folders and list(folders) == tasks
    assert len({f.lower() for f in folders.values()}) == len(tasks)
    for folder in folders.values():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", folder) and len(folder.encode()) <= MAX_FOLDER_NAME
        assert (tmp_path / "peft" / folder / "adapter_model.safetensors").is_file()
    assert folders["x" * 300].startswith("x" * 80) and folders == safe_names(tasks)
    assert safe_names(["y" * 299 + "b"]) == {"y" * 299 + "b": folders["y" * 299 + "b"]}  # stable: from the name alone


def test_merged_export_equals_the_task_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 8, "b": 5}).to_csv(data, index=False)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--lr", "0.05", "--eval-every", "6")) == 0
    assert main(["export", str(run), "--format", "merged", "--task", "b", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    loaded = load_run(run, device="cpu")
    input_ids = torch.randint(0, 250, (2, 10))
    with torch.no_grad(), loaded.bora.lora.activate({k: v[1:2] for k, v in loaded.task_factors.items()}):
        ours = loaded.bora.lora.lm(input_ids=input_ids).logits
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, ours, atol=1e-5, rtol=0)
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "m2")]) == 2


def test_export_of_some_tasks_reads_only_their_rows(tmp_path):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 10, "east": 6, "west": 4}).to_csv(data, index=False)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--steps", "4", "--eval-every", "2")) == 0
    assert main(["export", str(run), "--tasks", "west,global", "--out", str(tmp_path / "some")]) == 0
    assert json.loads((tmp_path / "some" / "tasks.json").read_text()) == {"west": "west", "global": "global"}
    assert sorted(p.name for p in (tmp_path / "some").iterdir() if p.is_dir()) == ["global", "west"]
    loaded = load_run(run)
    exported = peft.PeftModel.from_pretrained(tiny_random_llama()[0], str(tmp_path / "some" / "west"))
    state = {k: v for k, v in exported.state_dict().items() if "lora_B" in k}
    first = next(iter(state))
    layer = first.split("base_model.model.model.")[1].split(".lora_B")[0]
    torch.testing.assert_close(state[first], loaded.rows([2])[f"{layer}.B"][0], atol=1e-7, rtol=0)
    assert main(["export", str(run), "--tasks", "south", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_adapters_written_in_chunks_equal_the_whole(tmp_path):
    from bora_pyro.io.artifacts import AdapterFile, load_adapters, save_adapters

    g = torch.Generator().manual_seed(0)
    factors = {"a.A": torch.randn(7, 2, 3, generator=g), "a.B": torch.randn(7, 4, 2, generator=g)}
    theta = {k: v[0] for k, v in factors.items()}
    tasks = [f"t{d}" for d in range(7)]
    save_adapters(tmp_path / "whole.safetensors", tasks, factors, theta, {"rank": 2})
    chunks = [(torch.arange(s, min(s + 3, 7)), {k: v[s : s + 3] for k, v in factors.items()}) for s in (0, 3, 6)]
    save_adapters(
        tmp_path / "chunks.safetensors", tasks, chunks, theta, {"rank": 2}, shapes={"a.A": (2, 3), "a.B": (4, 2)}
    )
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "chunks.safetensors").read_bytes()
    names, loaded, loaded_theta, meta = load_adapters(tmp_path / "chunks.safetensors")
    assert names == tasks and meta == {"rank": 2} and torch.equal(loaded["a.B"], factors["a.B"])
    assert torch.equal(AdapterFile(tmp_path / "chunks.safetensors").rows([5, 1])["a.A"], factors["a.A"][[5, 1]])


def test_every_exported_adapter_serves_in_one_stock_peft_model_with_a_mixed_batch(tmp_path):
    """The serving path of multi-adapter servers: all adapters loaded into ONE PeftModel (load_adapter per
    task) and a batch whose rows name different adapters (adapter_names=[...]) gives our mixed-batch logits."""
    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 10, "east": 6, "west": 4}).to_csv(data, index=False)
    run, out = tmp_path / "run", tmp_path / "peft"
    assert main(train_args(data, run, "--lr", "0.05", "--targets", "all-linear", "--lora-dropout", "0.1")) == 0
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    folders = json.loads((out / "tasks.json").read_text())
    tasks = ["north", "east", "west"]
    model = peft.PeftModel.from_pretrained(tiny_random_llama()[0], out / folders[tasks[0]], adapter_name=tasks[0])
    for task in tasks[1:]:
        model.load_adapter(out / folders[task], adapter_name=task)
    model.eval()
    rows = [2, 0, 1, 1, 0, 2]
    input_ids = torch.randint(0, 250, (len(rows), 12))
    loaded = load_run(run, device="cpu")
    with torch.no_grad():
        theirs = model(input_ids=input_ids, adapter_names=[tasks[d] for d in rows]).logits
        with loaded.bora.lora.activate(loaded.task_factors, torch.tensor(rows)):
            ours = loaded.bora.lora.lm(input_ids=input_ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert json.loads((out / folders["north"] / "adapter_config.json").read_text())["lora_dropout"] == 0.1


@pytest.mark.parametrize("rank, expected", [(8, None), (24, "--max-lora-rank 32"), (600, "vLLM refuses it")])
def test_export_warns_where_vllm_would_refuse_or_slow_the_adapters(tmp_path, caplog, rank, expected):
    lora = MultiTaskLoRA(tiny_random_llama(hidden_size=max(32, rank))[0], rank=rank, alpha=rank, targets=["q_proj"])
    factors = {k: torch.zeros(1, *s) for k, s in lora.shapes().items()}
    with caplog.at_level("WARNING"):
        export_peft(lora, ["a"], factors, None, "tiny-random-llama", tmp_path / "peft")
    lines = [r.getMessage() for r in caplog.records if "vLLM" in r.getMessage()]
    assert (lines == []) if expected is None else (len(lines) == 1 and expected in lines[0])
