"""Tokenisation of documents in their input format (``input_format.py``): for a text, [BOS] + optional
task prompt (masked) + text + EOS; for an example, its prompt masked and its completion scored.

A document longer than ``max_tokens`` (an example: whose completion is) is split into consecutive chunks
(each a document of the same task, in the same split, with the same BOS and prompt as context) or, with
``long_documents="truncate"``, cut at ``max_tokens``. Either way the split's
:attr:`~bora_pyro.data.batching.Split.long_docs` counts the long documents, so that it can be reported:
nothing is cut silently.

Only as much text is tokenised as the chunks kept need: a truncated document, or one of a split whose
chunks are capped per task (``max_chunks_per_task``, the held-out splits' ``max_eval_docs``), has only
a prefix of its text tokenised, so memory and time are bounded by what is used, not by the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from .batching import IGNORE_INDEX, Split
from .formats import Document
from .input_format import InputFormat, token_ids

TEXT = InputFormat()  # text documents: BOS + text + EOS, no task prompt

LONG_DOCUMENTS = ("split", "truncate")


class Encoded(NamedTuple):
    """One tokenised document: its chunks kept, whether its scored part was longer than the token budget,
    whether ``chunks`` holds all of it (False: a chunk limit cut it short), and whether its prompt was cut."""

    chunks: list[tuple[list[int], list[int]]]
    long: bool
    complete: bool
    prompt_cut: bool = False


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
            ids = token_ids(tokenizer, text[:size])
            if len(ids) > limit:
                if previous is not None and previous[:limit] == ids[:limit]:
                    return ids[:limit], False
                previous = ids
            size *= 2
    return token_ids(tokenizer, text), True


def encode_document(
    tokenizer,
    document: Document,
    max_tokens: int,
    task: str = "",
    max_chunks: int | None = None,
    input_format: InputFormat = TEXT,
) -> Encoded:
    """Token ids and labels of one document of ``task``, as one or more chunks of at most ``max_tokens`` tokens.

    The context (BOS if the tokenizer has one, and the task prompt: ``input_format.context``) starts every
    chunk and is never scored, nor is position 0, which has nothing to be predicted from. A text is scored
    whole; an example (:class:`~bora_pyro.data.formats.Example`) as its input format says. An example that
    does not fit keeps its whole completion and loses the start of its prompt (``prompt_cut``); one whose
    scored part alone does not fit loses its prompt and is chunked like a text. Only the last chunk ends
    with EOS. ``max_chunks`` keeps only the first chunks (a text is then tokenised only as far as they need);
    truncating = ``max_chunks=1`` (cut there, without EOS).
    """
    context = input_format.context(tokenizer, task)
    if len(context) >= max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} is too small: the BOS token and task prompt "
            f"{input_format.task_text(task)!r} already take {len(context)} tokens; raise max_tokens or shorten "
            "the prompt"
        )
    room = max_tokens - len(context)
    cut = False
    if isinstance(document, str):
        ids, whole = leading_ids(tokenizer, document, None if max_chunks is None else max_chunks * room)
        if whole and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = ids
    else:
        ids, labels = input_format.body(tokenizer, document, task)
        whole = True
        if len(ids) > room:  # cut the unscored start (the prompt) from the left, all of it if need be
            lead = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            drop = min(len(ids) - room, lead)
            ids, labels, cut = ids[drop:], labels[drop:], drop > 0
    starts = range(0, max(len(ids), 1), room)
    kept = list(starts)[:max_chunks]
    chunks = []
    for start in kept:
        chunk_labels = [IGNORE_INDEX] * len(context) + list(labels[start : start + room])
        chunk_labels[0] = IGNORE_INDEX
        chunks.append((context + list(ids[start : start + room]), chunk_labels))
    long = not whole or len(starts) > 1
    return Encoded(chunks, long=long, complete=whole and len(kept) == len(starts), prompt_cut=cut)


def tokenize_split(
    name: str,
    tasks: Sequence[str],
    docs: Sequence[tuple[int, Document]],
    tokenizer,
    max_tokens: int,
    input_format: InputFormat = TEXT,
    long_documents: str = "split",
    max_chunks_per_task: int | None = None,
) -> Split:
    """Tokenise ``(task_index, document)`` pairs into a :class:`Split` (long ones split or cut, see the
    module docstring) in ``input_format`` (BOS, task prompt, loss mask, chat template).

    ``max_chunks_per_task`` keeps at most that many chunks of each task (its documents in order; the
    document that reaches the cap is cut short there, later ones are left out): None keeps every chunk.
    """
    if long_documents not in LONG_DOCUMENTS:
        raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
    input_ids, labels, task_index = [], [], []
    kept: Counter[int] = Counter()
    used = long = capped = cut = 0
    for task, document in docs:
        limit = None if max_chunks_per_task is None else max_chunks_per_task - kept[task]
        if limit is not None and limit < 1:
            continue
        if long_documents == "truncate":
            limit = 1
        try:
            encoded = encode_document(tokenizer, document, max_tokens, tasks[task], limit, input_format)
        except ValueError as err:  # a template that cannot render this example: say which one
            if isinstance(document, str):
                raise
            raise type(err)(f"{name} example {used + 1} (task {tasks[task]!r}): {err}") from None
        used += 1
        long += encoded.long
        cut += encoded.prompt_cut
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
        prompt_cut_docs=cut,
    )
