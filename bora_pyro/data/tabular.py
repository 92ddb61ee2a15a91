"""Generic corpora: rows of (task, text) from CSV, JSON lines, or a Hugging Face ``datasets`` source."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def read_table(kind: str, location: str) -> pd.DataFrame:
    """Read a table: ``kind`` is "csv", "jsonl" or "datasets" (a hub name or a saved dataset folder)."""
    if kind in ("csv", "jsonl"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} corpus file not found: {str(path)!r}")
        return pd.read_csv(path) if kind == "csv" else pd.read_json(path, lines=True)
    import datasets

    if Path(location).is_dir() and (Path(location) / "dataset_info.json").exists():
        ds = datasets.load_from_disk(location)
    else:
        ds = datasets.load_dataset(location, split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    return ds.to_pandas()


def documents_by_task(frame: pd.DataFrame, task_column: str, text_column: str, source: str) -> dict[str, list[str]]:
    """Group texts by task, in order of first appearance; empty/whitespace texts are dropped (counted)."""
    missing = [c for c in (task_column, text_column) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns present: {list(frame.columns)} "
            "(choose them with --task-column / --text-column)"
        )
    if frame.empty:
        raise ValueError(f"{source}: the table has no rows")
    tasks = frame[task_column]
    texts = frame[text_column]
    bad_task = tasks.isna() | (tasks.astype(str).str.strip() == "")
    if bad_task.any():
        raise ValueError(f"{source}: {int(bad_task.sum())} row(s) have an empty {task_column!r} value")
    empty = texts.isna() | (texts.astype(str).str.strip() == "")
    if empty.all():
        raise ValueError(f"{source}: every {text_column!r} value is empty")
    if empty.any():
        log.warning("%s: dropped %d empty or whitespace-only text(s)", source, int(empty.sum()))
    names = tasks.astype(str).str.strip()
    raw = tasks.astype(str)
    clashes = {n: sorted(set(raw[names == n])) for n in names.unique() if raw[names == n].nunique() > 1}
    if clashes:
        raise ValueError(f"{source}: task names that differ only by surrounding spaces: {clashes}")
    out: dict[str, list[str]] = {}
    for task, text in zip(names[~empty], texts[~empty].astype(str)):
        out.setdefault(task, []).append(text.strip())
    return out
