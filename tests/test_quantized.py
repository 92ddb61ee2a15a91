"""A quantised frozen base (--load-in-4bit / --load-in-8bit through bitsandbytes, which runs on CPU too): LoRA
on it learns what it would on the dequantised weights, the setting is recorded and honoured by every verb, and
what cannot be done with it is one line."""

from __future__ import annotations

import json

import pytest
import torch

from bora_pyro.cli import main
from bora_pyro.io.base_models import load_base_model, quantization_config, tiny_random_llama
from bora_pyro.nn.lora import MultiTaskLoRA

from .conftest import synthetic_rows, train_args

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random LLaMA saved as a model folder, wide enough (64) for bitsandbytes' 4-bit blocks."""
    folder = tmp_path_factory.mktemp("llama64")
    lm, tokenizer = tiny_random_llama(hidden_size=64)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def dequantized(quantized: torch.nn.Module, folder) -> torch.nn.Module:
    """The float32 model whose linear weights are the 4-bit model's, dequantised."""
    lm, _ = load_base_model(str(folder))
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            lm.get_submodule(name).weight.data.copy_(weight.float())
    return lm


def lora_loss_and_grads(lora, factors, input_ids):
    """The next-token NLL of ``input_ids`` under the factors (one task) and its gradients by factor."""
    lm = lora.lm
    leaves = {k: v.clone().requires_grad_() for k, v in factors.items()}
    with lora.activate(leaves, torch.zeros(len(input_ids), dtype=torch.long)):
        logits = lm(input_ids=input_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def test_lora_on_a_4bit_base_learns_what_it_would_on_the_dequantised_weights(saved_model):
    quantized, _ = load_base_model(str(saved_model), quantization=quantization_config(4, torch.float32))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    quantized, plain = (MultiTaskLoRA(lm, rank=4, alpha=8) for lm in (quantized, dequantized(quantized, saved_model)))
    shapes = plain.shapes()
    generator = torch.Generator().manual_seed(0)
    factors = {k: 0.1 * torch.randn(1, *shape, generator=generator) for k, shape in shapes.items()}
    input_ids = torch.randint(0, 259, (3, 12), generator=generator)
    for call in range(2):  # the second call too: bitsandbytes must not repack the layers for inference
        loss_q, grads_q = lora_loss_and_grads(quantized, factors, input_ids)
        loss_p, grads_p = lora_loss_and_grads(plain, factors, input_ids)
        assert loss_q == pytest.approx(loss_p.item(), rel=1e-5)
        for name in shapes:  # the first layer's factors too: the gradient crosses every quantised layer
            assert torch.allclose(grads_q[name], grads_p[name], rtol=1e-4, atol=1e-7), (call, name)
            assert grads_q[name].abs().sum() > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_base_is_recorded_and_every_verb_reloads_it(saved_model, tmp_path, capsys, bits):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8}).to_csv(data, index=False)
    run = tmp_path / "run"
    args = train_args(data, run, "--model", str(saved_model), f"--load-in-{bits}bit", "--curvature-docs", "0")
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config[f"load_in_{bits}bit"] is True
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_ppl"] < metrics["base_test_ppl"]  # 6 steps of LoRA on the quantised base learn
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0  # reloaded quantised: the same numbers
    assert json.loads(capsys.readouterr().out)["token_weighted_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    assert main(["generate", str(run), "--task", "a", "--prompt", "the", "--greedy"]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["export", str(run), "--format", "merged", "--task", "a", "--out", str(merged)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bits}-bit" in err[0] and "--format peft" in err[0]
    assert not merged.exists()


def test_quantisation_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6}).to_csv(data, index=False)
    run = tmp_path / "run"
    assert main(train_args(data, run, "--load-in-4bit", "--load-in-8bit")) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(train_args(data, run, "--load-in-4bit")) == 2  # the built-in tiny model is too narrow
    assert "quantise a saved model" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert main(train_args(data, run, "--model", "smollm2-135m", "--load-in-8bit")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bitsandbytes, which is not installed" in err[0]
    assert not run.exists()
