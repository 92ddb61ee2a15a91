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


def test_smollm2_chat_template_masks_exactly_the_assistant_turns(smollm2):
    """The shipped Instruct model's own template: the scored tokens are each assistant turn's content and its
    <|im_end|> line end, found independently in one tokenisation of the whole rendered conversation."""
    from bora_pyro.data import IGNORE_INDEX
    from bora_pyro.data.formats import Example
    from bora_pyro.data.input_format import InputFormat
    from bora_pyro.data.tokenize import encode_document

    _, tokenizer = smollm2
    messages = [
        {"role": "user", "content": "Rewrite: Jesus wept."},
        {"role": "assistant", "content": "And Jhesus wepte."},
        {"role": "user", "content": "Again, in Geneva's words."},
        {"role": "assistant", "content": "And Iesus wept."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for content in ("And Jhesus wepte.", "And Iesus wept."):
        start = text.index(f"<|im_start|>assistant\n{content}") + len("<|im_start|>assistant\n")
        spans.append((start, start + len(content) + len("<|im_end|>\n")))
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(a <= s and e <= b for a, b in spans) for s, e in whole["offset_mapping"]]
    fmt = InputFormat("messages", chat_template=tokenizer.chat_template, bos=False)
    ((ids, labels),) = encode_document(tokenizer, Example(None, tuple(messages)), 512, "t", None, fmt).chunks
    assert list(ids) == whole["input_ids"]
    assert [label != IGNORE_INDEX for label in labels] == inside
    scored = {i for i, label in enumerate(labels) if label != IGNORE_INDEX}
    second_turn = min(i for i in scored if i - 1 not in scored and i > min(scored))
    assert fmt.prompt_ids(tokenizer, messages[:3], "t") == list(ids[:second_turn])  # what generate feeds


def test_bible_translate_is_six_unequal_tasks_with_one_fixed_test_set(smollm2):
    _, tokenizer = smollm2
    corpus = bora_pyro.load_corpus("bible-translate", tokenizer, max_tokens=160, max_eval_docs=24)
    sizes = dict(zip(corpus.tasks, corpus.train.docs_per_task()))
    assert len(sizes) >= 6 and max(sizes.values()) >= 1000 and min(sizes.values()) <= 20
    assert corpus.input_format.data_format == "conversational prompt-completion"
    prompts = {}
    for task, example in corpus.heldout["test"]:
        prompts.setdefault(corpus.tasks[task], []).append(example.prompt[0]["content"])
    assert all(len(p) == 24 for p in prompts.values()) and len({tuple(p) for p in prompts.values()}) == 1
    from bora_pyro.data.bible_translate import bible_translate

    grouped = bible_translate()
    for task, documents in grouped.docs.items():
        by_split = {}
        for document, split in zip(documents, grouped.splits[task]):
            by_split.setdefault(split, set()).add(document.prompt[0]["content"])
        assert by_split["test"] == set(prompts[task]) and not by_split["train"] & (by_split["test"] | by_split["valid"])
