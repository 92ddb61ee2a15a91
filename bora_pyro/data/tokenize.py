"""Tokenisation of documents: [BOS] + optional task prompt (masked) + text + EOS, truncated."""

from __future__ import annotations

from typing import Sequence

from .batching import IGNORE_INDEX, Split


def encode_document(
    tokenizer, text: str, max_tokens: int, prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one document.

    The BOS token (if the tokenizer has one) and the prompt are context only: their labels are
    -100, as is position 0, which has nothing to be predicted from. Text that does not fit in
    ``max_tokens`` is truncated (and then gets no EOS: the document did not end there).
    """
    context: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if prompt:
        context += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(context) >= max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} is too small: the BOS token and task prompt {prompt!r} already take "
            f"{len(context)} tokens; raise max_tokens or shorten the prompt"
        )
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        body = body + [tokenizer.eos_token_id]
    ids = (context + body)[:max_tokens]
    labels = [IGNORE_INDEX] * len(context) + ids[len(context):]
    labels[0] = IGNORE_INDEX
    return ids, labels


def tokenize_split(
    name: str,
    tasks: Sequence[str],
    docs: Sequence[tuple[int, str]],
    tokenizer,
    max_tokens: int,
    task_prompt: str | None = None,
) -> Split:
    """Tokenise ``(task_index, text)`` documents into a :class:`Split`.

    ``task_prompt`` is a format string with ``{task}`` (e.g. ``"{task}: "``), or None for no prompt.
    """
    input_ids, labels, task_index = [], [], []
    for task, text in docs:
        prompt = task_prompt.format(task=tasks[task]) if task_prompt else None
        ids, lab = encode_document(tokenizer, text, max_tokens, prompt)
        input_ids.append(tuple(ids))
        labels.append(tuple(lab))
        task_index.append(task)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Split(name, tuple(tasks), tuple(input_ids), tuple(labels), tuple(task_index), int(pad))
