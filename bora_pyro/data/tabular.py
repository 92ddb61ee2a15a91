"""Generic corpora: rows of (task, text) from CSV, JSON lines, or a Hugging Face ``datasets`` source.

CSV and JSON-lines files must be UTF-8 (a byte-order mark is accepted) and are read as text: a task
or text is exactly what the file holds, so ``NA``, ``null``, ``NaN``, ``001`` or ``TRUE`` in a CSV
are names and texts, never missing values or numbers. In JSON lines a string is its content, a
number or boolean its JSON text as written (``7`` -> ``"7"``, ``1.50`` -> ``"1.50"``, ``true`` ->
``"true"``), an object or array its JSON text, and ``null`` (or an absent key) is a missing value: an
error for a task, an empty (dropped) text.

The frames read here are indexed by where each row starts in its source ("line" for files, 1-based
"row" for ``datasets``), so that errors can say where to look.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import shlex
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def read_table(kind: str, location: str) -> pd.DataFrame:
    """Read a table: ``kind`` is "csv", "jsonl" or "datasets" (a hub name or a saved dataset folder)."""
    if kind in ("csv", "jsonl"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} corpus file not found: {str(path)!r}")
        text = _read_utf8(path)
        return _read_csv_text(path, text) if kind == "csv" else _read_jsonl_text(path, text)
    return _read_datasets(location)


def _read_utf8(path: Path) -> str:
    """The file's text, decoded as UTF-8 with or without a byte-order mark; other encodings are refused."""
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        quoted = shlex.quote(str(path))
        raise ValueError(
            f"{path}: not a UTF-8 file: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) is not "
            f"valid UTF-8 ({err.reason}); convert the file to UTF-8 and load the converted file, e.g. for Latin-1: "
            f"iconv -f latin1 -t utf-8 {quoted} > {quoted}.utf8"
        ) from None


def _read_csv_text(path: Path, text: str) -> pd.DataFrame:
    """A CSV table (header row, then one row per line or quoted multi-line record), every cell as text."""
    old_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # documents may be long
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise ValueError(
                f"{path}: the file is empty; expected a header row naming the columns, then one row per document"
            )
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise ValueError(f"{path}: the header names column(s) {repeated} more than once; rename them")
        rows, lines = [], []
        start = reader.line_num + 1
        for record in reader:
            if record:  # blank lines are skipped
                if len(record) != len(header):
                    raise ValueError(
                        f"{path}: line {start} has {len(record)} field(s) but the header has {len(header)} "
                        f"({header}); put fields that contain commas, quotes or line breaks in double quotes"
                    )
                rows.append(record)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}: not a valid CSV file near line {reader.line_num}: {err}") from None
    finally:
        csv.field_size_limit(old_limit)
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=object)


def _read_jsonl_text(path: Path, text: str) -> pd.DataFrame:
    """A JSON-lines table: one JSON object per line (blank lines skipped), values as text (module docstring)."""
    records, lines = [], []
    for number, line in enumerate(io.StringIO(text, newline=""), 1):
        if not line.strip():
            continue
        try:  # numbers (and NaN/Infinity) stay the text they are written as
            record = json.loads(line.rstrip(), parse_int=str, parse_float=str, parse_constant=str)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno}): {line.strip()[:80]!r}; "
                "a JSON-lines file holds one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: line {number} is a JSON {type(record).__name__}, not an object; a JSON-lines "
                'corpus holds one object per line, e.g. {"task": "a", "text": "..."}'
            )
        records.append({key: _json_text(value) for key, value in record.items()})
        lines.append(number)
    return pd.DataFrame(records, index=pd.Index(lines, name="line"), dtype=object)


def _json_text(value: object) -> str | None:
    """A parsed JSON value as text: strings (and numbers, parsed as strings) as they are; null -> None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _read_datasets(location: str) -> pd.DataFrame:
    """A Hugging Face ``datasets`` source (hub name or local folder) as a frame (rows numbered from 1);
    never runs code from the source.

    ``datasets`` >= 4 no longer runs loading scripts at all (it refuses a source that has one);
    ``trust_remote_code=False`` makes older versions refuse them too. A local source's script (the
    file ``datasets`` would run) is refused here with a clearer message before ``datasets`` sees it.
    """
    import datasets

    path = Path(location)
    script = path if path.suffix == ".py" else path / f"{path.name}.py"
    if script.is_file():
        raise ValueError(
            f"datasets:{location}: {str(script)!r} is a dataset loading script, and bora_pyro never runs code from "
            "a data source; point datasets: at the data files' folder (csv, json, parquet...) without the script, "
            "or at a dataset saved with save_to_disk"
        )
    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(location)
    else:
        ds = datasets.load_dataset(location, split="train", trust_remote_code=False)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    frame = ds.to_pandas()
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame


def documents_by_task(frame: pd.DataFrame, task_column: str, text_column: str, source: str) -> dict[str, list[str]]:
    """Group texts by task, in order of first appearance; empty/whitespace texts are dropped (counted)."""
    if len(frame) == 0:
        raise ValueError(f"{source}: the table has no rows")
    missing = [c for c in (task_column, text_column) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns present: {list(frame.columns)} "
            "(choose them with --task-column / --text-column)"
        )
    tasks = frame[task_column]
    texts = frame[text_column]
    bad_task = tasks.isna() | (tasks.astype(str).str.strip() == "")
    if bad_task.any():
        where = frame.index[bad_task.to_numpy()]
        shown = ", ".join(str(i) for i in where[:10]) + (", ..." if len(where) > 10 else "")
        raise ValueError(
            f"{source}: {len(where)} row(s) have an empty or missing {task_column!r} value ({where.name or 'row'} "
            f"{shown}); every row needs a task name"
        )
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
