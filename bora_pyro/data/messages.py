"""Short one-line renderings of user data (names, columns, rows) for error and warning messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SHOWN = 10  # items shown before "..."
WIDTH = 60  # characters of one item shown


def shown_value(value: object, width: int = WIDTH) -> str:
    """``repr(value)`` on one line, a long one cut with its length said."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(str(value))} characters)"


def shown_list(values: Iterable[object], limit: int = SHOWN) -> str:
    """A list's repr on one line: the first ``limit`` items (each cut to :data:`WIDTH`), then how many in all."""
    values = list(values)
    items = ", ".join(shown_value(v) for v in values[:limit])
    return f"[{items}, ... ({len(values)} in all)]" if len(values) > limit else f"[{items}]"


def shown_dict(mapping: dict, limit: int = SHOWN) -> str:
    """A dict's repr on one line: the first ``limit`` items (each key and value cut), then how many in all."""
    items = ", ".join(f"{shown_value(k)}: {shown_value(v)}" for k, v in list(mapping.items())[:limit])
    return f"{{{items}, ... ({len(mapping)} in all)}}" if len(mapping) > limit else f"{{{items}}}"


def shown_rows(where: Sequence[object], label: str, limit: int = SHOWN) -> str:
    """Where rows are, e.g. ``line 2, 5, 9, ...`` (the first ``limit``)."""
    shown = ", ".join(str(i) for i in where[:limit]) + (", ..." if len(where) > limit else "")
    return f"{label} {shown}"
