"""Tokenisation of documents: [BOS] + optional task prompt (masked) + text + EOS.

A document longer than ``max_tokens`` is split into consecutive chunks (each a document of the same
task, in the same split, with the same BOS and prompt as context) or, with ``long_documents="truncate"``,
cut at ``max_tokens``. Either way the split's :attr:`~bora_pyro.data.batching.Split.long_docs`
counts the long documents, so that it can be reported: nothing is cut silently.

Only as much text is tokenised as the chunks kept need: a truncated document, or one of a split whose
chunks are capped per task (``max_chunks_per_task``, the held-out splits' ``max_eval_docs``), has only
a prefix of its text tokenised, so memory and time are bounded by what is used, not by the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from .batching import IGNORE_INDEX, Split

LONG_DOCUMENTS = ("split", "truncate")


class Encoded(NamedTuple):
    """One tokenised document: its chunks kept, whether it was longer than the token budget, and whether
    ``chunks`` holds all of it (False: a chunk limit cut it short)."""

    chunks: list[tuple[list[int], list[int]]]
    long: bool
    complete: bool


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def leading_ids(tokenizer, text: str, limit: int | None) -> tuple[list[int], bool]:
    """The token ids of ``text`` (no special tokens), or, with ``limit``, at least its first ``limit`` ones,
    tokenising only a prefix of the text. Returns (ids, whole): ``whole`` is False when the ids are the first
    ``limit`` of a longer text.

    The prefix doubles until two successive prefixes each yield more than ``limit`` tokens and agree on the
    first ``limit``: the tokens at a prefix's cut (a word cut in two, merges that the rest of the text would
    change) are never kept, and no characters-per-token ratio is assumed, so it holds for any tokenizer whose
    first tokens do not depend on text beyond twice the prefix that yields them.
    """
    if limit is not None:
        size, previous = 4 * limit + 64, None
        while size < len(text):
            ids = _ids(tokenizer, text[:size])
            if len(ids) > limit:
                if previous is not None and previous[:limit] == ids[:limit]:
                    return ids[:limit], False
                previous = ids
            size *= 2
    return _ids(tokenizer, text), True


def encode_document(
    tokenizer, text: str, max_tokens: int, prompt: str | None = None, max_chunks: int | None = None
) -> Encoded:
    """Token ids and labels of one document, as one or more chunks of at most ``max_tokens`` tokens.

    The BOS token (if the tokenizer has one) and the prompt are context only: their labels are
    -100, as is position 0, which has nothing to be predicted from. Every chunk starts with that
    context; only the last chunk ends with EOS (the document ends there). ``max_chunks`` keeps only the
    first chunks, and only the text they need is tokenised; truncating = ``max_chunks=1`` (the text is cut
    there, without EOS).
    """
    context: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if prompt:
        context += _ids(tokenizer, prompt)
    if len(context) >= max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} is too small: the BOS token and task prompt {prompt!r} already take "
            f"{len(context)} tokens; raise max_tokens or shorten the prompt"
        )
    room = max_tokens - len(context)
    body, whole = leading_ids(tokenizer, text, None if max_chunks is None else max_chunks * room)
    if whole and tokenizer.eos_token_id is not None:
        body = body + [tokenizer.eos_token_id]
    pieces = [body[start : start + room] for start in range(0, max(len(body), 1), room)]
    kept = pieces[:max_chunks]
    chunks = []
    for piece in kept:
        ids = context + piece
        labels = [IGNORE_INDEX] * len(context) + piece
        labels[0] = IGNORE_INDEX
        chunks.append((ids, labels))
    return Encoded(chunks, long=not whole or len(pieces) > 1, complete=whole and len(kept) == len(pieces))


def tokenize_split(
    name: str,
    tasks: Sequence[str],
    docs: Sequence[tuple[int, str]],
    tokenizer,
    max_tokens: int,
    task_prompt: str | None = None,
    long_documents: str = "split",
    max_chunks_per_task: int | None = None,
) -> Split:
    """Tokenise ``(task_index, text)`` documents into a :class:`Split` (long ones split or cut, see the
    module docstring).

    ``task_prompt`` is a format string with ``{task}`` (e.g. ``"{task}: "``), or None for no prompt.
    ``max_chunks_per_task`` keeps at most that many chunks of each task (its documents in order; the
    document that reaches the cap is cut short there, later ones are left out): None keeps every chunk.
    """
    if long_documents not in LONG_DOCUMENTS:
        raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
    input_ids, labels, task_index = [], [], []
    kept: Counter[int] = Counter()
    used = long = capped = 0
    for task, text in docs:
        limit = None if max_chunks_per_task is None else max_chunks_per_task - kept[task]
        if limit is not None and limit < 1:
            continue
        if long_documents == "truncate":
            limit = 1
        prompt = task_prompt.format(task=tasks[task]) if task_prompt else None
        encoded = encode_document(tokenizer, text, max_tokens, prompt, limit)
        used += 1
        long += encoded.long
        capped += long_documents == "split" and not encoded.complete
        kept[task] += len(encoded.chunks)
        for ids, lab in encoded.chunks:
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
        source_docs=used,
        long_docs=long,
        capped_docs=capped,
    )
