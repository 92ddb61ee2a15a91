"""Tokenisation of documents: [BOS] + optional task prompt (masked) + text + EOS.

A document longer than ``max_tokens`` is split into consecutive chunks (each a document of the same
task, in the same split, with the same BOS and prompt as context) or, with ``long_documents="truncate"``,
cut at ``max_tokens``. Either way the split's :attr:`~bora_pyro.data.batching.Split.long_docs`
counts the long documents, so that it can be reported: nothing is cut silently.
"""

from __future__ import annotations

from collections.abc import Sequence

from .batching import IGNORE_INDEX, Split

LONG_DOCUMENTS = ("split", "truncate")


def encode_document(
    tokenizer, text: str, max_tokens: int, prompt: str | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of one document, as one or more chunks of at most ``max_tokens`` tokens.

    The BOS token (if the tokenizer has one) and the prompt are context only: their labels are
    -100, as is position 0, which has nothing to be predicted from. Every chunk starts with that
    context; only the last chunk ends with EOS (the document ends there). Truncating = keeping the
    first chunk only (the text is cut there, without EOS).
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
    room = max_tokens - len(context)
    pieces = [body[start : start + room] for start in range(0, max(len(body), 1), room)]
    chunks = []
    for piece in pieces:
        ids = context + piece
        labels = [IGNORE_INDEX] * len(context) + piece
        labels[0] = IGNORE_INDEX
        chunks.append((ids, labels))
    return chunks


def tokenize_split(
    name: str,
    tasks: Sequence[str],
    docs: Sequence[tuple[int, str]],
    tokenizer,
    max_tokens: int,
    task_prompt: str | None = None,
    long_documents: str = "split",
) -> Split:
    """Tokenise ``(task_index, text)`` documents into a :class:`Split` (long ones split or cut, see the
    module docstring).

    ``task_prompt`` is a format string with ``{task}`` (e.g. ``"{task}: "``), or None for no prompt.
    """
    if long_documents not in LONG_DOCUMENTS:
        raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
    input_ids, labels, task_index = [], [], []
    long = 0
    for task, text in docs:
        prompt = task_prompt.format(task=tasks[task]) if task_prompt else None
        chunks = encode_document(tokenizer, text, max_tokens, prompt)
        long += len(chunks) > 1
        for ids, lab in chunks[:1] if long_documents == "truncate" else chunks:
            input_ids.append(tuple(ids))
            labels.append(tuple(lab))
            task_index.append(task)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Split(
        name,
        tuple(tasks),
        tuple(input_ids),
        tuple(labels),
        tuple(task_index),
        int(pad),
        source_docs=len(docs),
        long_docs=long,
    )
