"""The formats a corpus' rows may take: Hugging Face TRL's dataset conventions.

    text               a ``text`` column (``--text-column``): language modelling, every token scored
    prompt-completion  ``prompt`` and ``completion`` columns: the loss on the completion's tokens only
    messages           a ``messages`` column: a conversation, a list of ``{"role": ..., "content": ...}``,
                       rendered with the tokenizer's chat template: the loss on the assistant turns only

``prompt`` and ``completion`` may both be message lists (conversational prompt-completion: the prompt's
conversation, then the completion's turns, which are scored). ``--data-format auto`` (the default)
detects the format from the columns as TRL does: ``messages`` if present, else ``prompt`` and
``completion``, else the text column. A message list is JSON text in a CSV cell, a native list in JSON
lines, ``datasets`` and Python objects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from .messages import shown_list, shown_rows, shown_value

log = logging.getLogger(__name__)

DATA_FORMATS = ("auto", "text", "prompt-completion", "messages")
PROMPT, COMPLETION, MESSAGES = "prompt", "completion", "messages"
CONVERSATIONAL = "conversational prompt-completion"  # prompt-completion whose sides are message lists

Messages = tuple[dict, ...]  # each {"role": str, "content": str, ...}


class Example(NamedTuple):
    """One example of a prompt-completion or conversational corpus (a text corpus' documents are strings).

    ``prompt``: text, a message list, or None (a ``messages`` conversation: its assistant turns are scored);
    ``completion``: text, or the message list that follows the prompt (or the whole conversation)."""

    prompt: str | Messages | None
    completion: str | Messages

    @property
    def conversational(self) -> bool:
        """Whether it is rendered with a chat template (its sides are message lists)."""
        return not isinstance(self.completion, str)


Document = str | Example  # a text corpus' documents are their texts


def detect_format(columns: Sequence[str], data_format: str, text_column: str, source: str) -> str:
    """The format of a table with ``columns`` ("text", "prompt-completion" or "messages"): ``data_format``
    checked against the columns, or detected from them when it is "auto"."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    if data_format == "auto":
        if MESSAGES in columns:
            return "messages"
        if PROMPT in columns and COMPLETION in columns:
            return "prompt-completion"
        return "text"
    needed = format_columns(data_format, text_column)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"{source}: --data-format {data_format} needs the column(s) {shown_list(missing)}; columns present: "
            f"{shown_list(columns, 20)}"
        )
    return data_format


def format_columns(data_format: str, text_column: str) -> tuple[str, ...]:
    """The columns a format reads."""
    return {"text": (text_column,), "prompt-completion": (PROMPT, COMPLETION), "messages": (MESSAGES,)}[data_format]


def parse_examples(frame: pd.DataFrame, data_format: str, text_column: str, source: str) -> list[Document | None]:
    """Every row's document in ``data_format`` (None where it has nothing to train on: an empty text or
    completion, dropped by the caller with a warning). A cell that is not what the format needs is an
    error naming its row and column."""
    if data_format == "text":
        return [_text(value) for value in frame[text_column]]
    if data_format == "messages":
        conversations = [
            parse_messages(value, where, MESSAGES, source) for value, where in zip(frame[MESSAGES], _rows(frame))
        ]
        return [Example(None, m) if any(t["role"] == "assistant" for t in m) else None for m in conversations]
    prompts, completions = frame[PROMPT], frame[COMPLETION]
    sides = [
        (_side(p, where, PROMPT, source), _side(c, where, COMPLETION, source))
        for p, c, where in zip(prompts, completions, _rows(frame))
    ]
    kinds = {(isinstance(p, tuple), isinstance(c, tuple)) for p, c in sides if not _empty(c)}
    if len(kinds) > 1 or kinds - {(False, False), (True, True)}:
        mixed = [
            where
            for (p, c), where in zip(sides, frame.index)
            if not _empty(c) and isinstance(p, tuple) != isinstance(c, tuple)
        ]
        rows = shown_rows(mixed, frame.index.name or "row") if mixed else "rows differ"
        raise ValueError(
            f"{source}: the {PROMPT!r} and {COMPLETION!r} columns must both be texts, or both message lists "
            f"(conversational prompt-completion) in every row ({rows}); convert them to one kind"
        )
    unprompted = [where for (p, c), where in zip(sides, frame.index) if p is None and not _empty(c)]
    if unprompted:
        log.warning(
            "%s: %d row(s) have no %r value (%s): trained with an empty prompt",
            source,
            len(unprompted),
            PROMPT,
            shown_rows(unprompted, frame.index.name or "row"),
        )
    return [None if _empty(c) else Example(p or ("" if isinstance(c, str) else ()), c) for p, c in sides]


def _empty(completion: str | Messages | None) -> bool:
    """A completion with nothing to train on: missing, empty or whitespace-only text."""
    return completion is None or (isinstance(completion, str) and not completion.strip())


def _rows(frame: pd.DataFrame) -> list[str]:
    label = frame.index.name or "row"
    return [f"{label} {i}" for i in frame.index]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _text(value: object) -> str | None:
    """A text cell: its text stripped (None when empty or missing)."""
    if _missing(value):
        return None
    text = str(value).strip()
    return text or None


def _side(value: object, where: str, column: str, source: str) -> str | Messages | None:
    """A prompt or completion cell: a message list (a native list or JSON text of a list of messages),
    else its text (not stripped: a prompt's trailing space or newline is part of its format)."""
    if _missing(value):
        return None
    if isinstance(value, (list, tuple, np.ndarray)) or _looks_like_messages(value):
        return parse_messages(value, where, column, source)
    return str(value)


def _looks_like_messages(value: object) -> bool:
    """Whether a text cell holds a JSON list of messages (the form of a message list in a CSV cell)."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return False
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(parsed, list) and bool(parsed) and all(isinstance(m, dict) and "role" in m for m in parsed)


def parse_messages(value: object, where: str, column: str, source: str) -> Messages:
    """A value holding a conversation: a list of {"role": str, "content": str} (JSON text or native)."""
    if _missing(value):
        raise ValueError(f"{source}: {where}: the {column!r} value is missing; expected a list of messages")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source}: {where}: the {column!r} value is not valid JSON ({err.msg}, character {err.pos}): "
                f"{shown_value(value)}; expected a JSON list of messages, e.g. "
                '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'
            ) from None
        except RecursionError:
            raise ValueError(f"{source}: {where}: the {column!r} value nests JSON too deeply") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{source}: {where}: the {column!r} value is {shown_value(value)}; expected a non-empty list of "
            'messages, each {"role": ..., "content": ...}'
        )
    return tuple(_message(m, where, column, source, k) for k, m in enumerate(value))


def _message(message: object, where: str, column: str, source: str, k: int) -> dict:
    if not isinstance(message, Mapping):
        raise ValueError(
            f"{source}: {where}: message {k} of {column!r} is {shown_value(message)}; expected an object with "
            '"role" and "content"'
        )
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role.strip():
        raise ValueError(f"{source}: {where}: message {k} of {column!r} has role {role!r}; expected a role name")
    if not isinstance(content, str):
        raise ValueError(
            f"{source}: {where}: message {k} of {column!r} (role {role!r}) has content {shown_value(content)}; "
            "expected text"
        )
    return {**message, "role": role, "content": content}  # other keys (name, tool calls...) go to the template


def format_name(documents: Sequence[Document]) -> str:
    """The name a run records for its documents' format: text, prompt-completion, messages or
    conversational prompt-completion."""
    first = next(iter(documents), "")
    if isinstance(first, str):
        return "text"
    if first.prompt is None:
        return "messages"
    return CONVERSATIONAL if first.conversational else "prompt-completion"
