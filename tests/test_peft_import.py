"""PEFT import: a PEFT LoRA adapter becomes the start of Theta and of every task, same logits."""

from __future__ import annotations

import json

import pytest
import torch

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.io.peft_import import import_peft
from bora_pyro.runs import load_run

from .conftest import synthetic_rows, train_args

peft = pytest.importorskip("peft")


def saved_peft_adapter(folder, r=4, alpha=8.0, use_rslora=False, targets=("q_proj", "v_proj")):
    """A PEFT LoRA adapter on tiny-random-llama with non-zero B (so it changes the logits)."""
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora
    )
    model = peft.get_peft_model(tiny_random_llama()[0], config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_imported_adapter_gives_peft_logits_for_every_task(tmp_path, use_rslora):
    theirs_model = saved_peft_adapter(tmp_path / "adapter", use_rslora=use_rslora)
    bora = bora_pyro.BoRA(tiny_random_llama()[0], ["a", "b", "c"], rank=4, alpha=16.0, tau=10.0)  # other scaling
    bora.start_from(import_peft(bora.lora, tmp_path / "adapter"))
    input_ids = torch.randint(0, 250, (3, 10))
    with torch.no_grad():
        theirs = theirs_model(input_ids=input_ids).logits
        with bora.lora.activate(bora.task_factors(), torch.tensor([0, 1, 2])):
            ours = bora.lora.lm(input_ids=input_ids).logits
        with bora.lora.activate({k: v.unsqueeze(0) for k, v in bora.global_factors().items()}):
            ours_global = bora.lora.lm(input_ids=input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_global, theirs, atol=1e-5, rtol=0)


def test_train_with_init_peft_records_it_and_starts_there(tmp_path):
    saved_peft_adapter(tmp_path / "adapter", r=8, alpha=16.0)
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 8, "b": 5}).to_csv(data, index=False)
    run = tmp_path / "run"
    options = ["--steps", "2", "--lr", "1e-6", "--eval-every", "2", "--init-peft", str(tmp_path / "adapter")]
    assert main(train_args(data, run, *options)) == 0
    assert json.loads((run / "config.json").read_text())["adapter"]["init_peft"] == str(tmp_path / "adapter")
    loaded = load_run(run, device="cpu")
    expected = import_peft(loaded.bora.lora, tmp_path / "adapter")
    for name, value in expected.items():  # two steps at lr 1e-6 stay at the imported start
        torch.testing.assert_close(loaded.global_factors[name], value, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 2}, "adapter rank r=2 differs from this model's rank 4; pass --rank 2"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"target_modules": ["q_proj"]}, "targets other modules"),
    ],
)
def test_bad_peft_adapters_are_refused(tmp_path, change, message):
    saved_peft_adapter(
        tmp_path / "adapter", r=change.get("r", 4), targets=change.get("target_modules", ["q_proj", "v_proj"])
    )
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update({k: v for k, v in change.items() if k not in ("r", "target_modules")})
    config_file.write_text(json.dumps(config))
    bora = bora_pyro.BoRA(tiny_random_llama()[0], ["a"], rank=4, tau=10.0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_peft(bora.lora, tmp_path / "adapter")


def test_missing_adapter_folder_is_a_clear_error(tmp_path):
    bora = bora_pyro.BoRA(tiny_random_llama()[0], ["a"], rank=4, tau=10.0)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        import_peft(bora.lora, tmp_path / "nowhere")
