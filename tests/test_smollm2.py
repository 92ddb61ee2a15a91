"""Slow tests on the real embedded SmolLM2-135M (converted once from the wheel's GGUF, then cached)."""

from __future__ import annotations

import json

import pytest
import torch

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.evaluation.perplexity import evaluate_log_likelihood
from bora_pyro.models.likelihood import token_log_probs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return bora_pyro.load_base_model("smollm2-135m", device="cpu")


def test_smollm2_loads_and_knows_english_better_than_wycliffe(smollm2):
    lm, tokenizer = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None

    def base_perplexity(translation: str) -> float:
        corpus = bora_pyro.load_corpus("bible-books", tokenizer, translation=translation, books=("Jonah",))
        score = lambda b: token_log_probs(
            lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels
        ).sum(-1)
        return evaluate_log_likelihood(score, corpus.test, torch.device("cpu")).token_weighted

    assert 3 * base_perplexity("kjv") < base_perplexity("wyc")  # Wycliffe is the unfamiliar variety


def test_smollm2_short_training_beats_the_base_model(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "smollm2-135m",
                "--books",
                "Jonah,Obadiah,Ruth",
                "--steps",
                "12",
                "--batch-size",
                "4",
                "--max-tokens",
                "48",
                "--max-eval-docs",
                "3",
                "--eval-every",
                "6",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_ppl"] < 0.8 * metrics["base_test_ppl"]
