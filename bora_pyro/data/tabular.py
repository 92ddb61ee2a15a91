"""Generic corpora: rows of (task, text) from CSV, JSON lines, or a Hugging Face ``datasets`` source.

CSV and JSON-lines files must be UTF-8 (a byte-order mark is accepted) and are read as text: a task
or text is exactly what the file holds, so ``NA``, ``null``, ``NaN``, ``001`` or ``TRUE`` in a CSV
are names and texts, never missing values or numbers. In JSON lines a string is its content, a
number or boolean its JSON text as written (``7`` -> ``"7"``, ``1.50`` -> ``"1.50"``, ``true`` ->
``"true"``), an object or array its JSON text, and ``null`` (or an absent key) is a missing value: an
error for a task, an empty (dropped) text. A line that repeats the task or text key, nests too deeply to
parse, or holds an unpaired surrogate escape (``"\\ud800"``, not a character) is refused, naming the line.

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
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .formats import Document, detect_format, format_columns, format_name, parse_examples
from .messages import shown_dict, shown_list, shown_rows

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}


def read_table(
    kind: str, location: str, columns: Sequence[str] | None = None, split_column: str | None = "split"
) -> pd.DataFrame:
    """Read a table: ``kind`` is "csv", "jsonl" or "datasets" (a hub name or a saved dataset folder; a
    DatasetDict's splits become ``split_column``, see :func:`dataset_frame`).

    ``columns``: the columns wanted (None: all); JSON lines and ``datasets`` keep only those, so that a file of
    many sparse keys cannot make a frame of rows x keys. Every column the source has is in ``frame.attrs["columns"]``.
    """
    if kind in ("csv", "jsonl"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} corpus file not found: {str(path)!r}")
        text = _read_utf8(path)
        return _read_csv_text(path, text) if kind == "csv" else _read_jsonl_text(path, text, columns)
    return _read_datasets(location, columns, split_column)


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
    """A CSV table (header row, then one row per line or quoted multi-line record; blank lines are skipped),
    every cell as text."""
    old_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # documents may be long
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next((record for record in reader if record), None)
        if header is None:
            raise ValueError(
                f"{path}: the file is empty; expected a header row naming the columns, then one row per document"
            )
        repeated = [name for name, n in Counter(header).items() if n > 1]
        if repeated:
            raise ValueError(f"{path}: the header names column(s) {shown_list(repeated)} more than once; rename them")
        rows, lines = [], []
        start = reader.line_num + 1
        for record in reader:
            if record:
                if len(record) != len(header):
                    raise ValueError(
                        f"{path}: line {start} has {len(record)} field(s) but the header has {len(header)} "
                        f"({shown_list(header)}); put fields that contain commas, quotes or line breaks in double "
                        "quotes"
                    )
                rows.append(record)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}: not a valid CSV file near line {reader.line_num}: {err}") from None
    finally:
        csv.field_size_limit(old_limit)
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=object)


class _Object(dict):
    """A parsed JSON object that remembers the keys it repeats (``json`` would keep the last value silently)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated = [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]


def _read_jsonl_text(path: Path, text: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A JSON-lines table: one JSON object per line (blank lines skipped), values as text (module docstring);
    only ``columns`` are kept (None: all), every key seen is in ``attrs["columns"]``."""
    records, lines, keys = [], [], {}
    for number, line in enumerate(io.StringIO(text, newline=""), 1):
        if line.strip():
            record = _json_record(path, number, line, columns)
            keys.update(dict.fromkeys(record))
            records.append({key: _json_value(path, number, key, record[key]) for key in _kept(record, columns)})
            lines.append(number)
    frame = pd.DataFrame(records, index=pd.Index(lines, name="line"), columns=_kept(keys, columns), dtype=object)
    frame.attrs["columns"] = list(keys)
    return frame


def _kept(keys: Iterable[str], columns: Sequence[str] | None) -> list[str]:
    return [key for key in keys if columns is None or key in columns]


def _json_record(path: Path, number: int, line: str, columns: Sequence[str] | None) -> _Object:
    """Line ``number`` of a JSON-lines file parsed: an object whose wanted keys are not repeated."""
    try:  # numbers (and NaN/Infinity) stay the text they are written as
        record = json.loads(
            line.rstrip(), parse_int=str, parse_float=str, parse_constant=str, object_pairs_hook=_Object
        )
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno}): {line.strip()[:80]!r}; "
            "a JSON-lines file holds one JSON object per line"
        ) from None
    except RecursionError:
        raise ValueError(
            f"{path}: line {number} nests JSON arrays or objects too deeply to read; a JSON-lines corpus holds "
            'one flat object per line, e.g. {"task": "a", "text": "..."}'
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}: line {number} is a JSON {_json_kind(line)}, not an object; a JSON-lines "
            'corpus holds one object per line, e.g. {"task": "a", "text": "..."}'
        )
    repeated = _kept(record.repeated, columns)
    if repeated:
        raise ValueError(
            f"{path}: line {number} gives the key(s) {shown_list(repeated)} more than once; give each key once per line"
        )
    return record


def _json_kind(line: str) -> str:
    """What kind of JSON value a line that is not an object holds (numbers are parsed as text, so told by the
    line's first character)."""
    return {"[": "list", '"': "string", "n": "null", "t": "boolean", "f": "boolean"}.get(line.lstrip()[:1], "number")


def _json_value(path: Path, number: int, key: str, value: object) -> str | None:
    """A value of line ``number`` as text (:func:`_json_text`); one that is not a valid Unicode text (an
    unpaired surrogate escape such as ``\\ud800``) is refused."""
    try:
        text = _json_text(value)
    except RecursionError:
        raise ValueError(f"{path}: line {number}: the {key!r} value nests arrays or objects too deeply") from None
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{path}: line {number}: the {key!r} value holds {text[err.start]!r}, an unpaired UTF-16 surrogate "
                "escape that is no character; escape characters outside the BMP as a surrogate pair or write them "
                "as UTF-8"
            ) from None
    return text


def _json_text(value: object) -> str | None:
    """A parsed JSON value as text: strings (and numbers, parsed as strings) as they are; null -> None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _read_datasets(
    location: str, columns: Sequence[str] | None = None, split_column: str | None = "split"
) -> pd.DataFrame:
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
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(location)
    else:
        ds = datasets.load_dataset(location, trust_remote_code=False)
    return dataset_frame(ds, columns, split_column, f"datasets:{location}")


def dataset_frame(
    ds, columns: Sequence[str] | None = None, split_column: str | None = "split", source: str = "dataset"
) -> pd.DataFrame:
    """A ``datasets.Dataset`` or ``DatasetDict`` as a frame (rows numbered from 1). A DatasetDict's splits
    become the ``split_column`` (train, validation or valid, test; a dict of only ``train`` gives no split
    column: the run splits it); with ``split_column`` None, only its ``train`` split is read."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        unknown = [name for name in names if name.lower() not in SPLIT_NAMES]
        if split_column is None or names == ["train"]:
            if "train" not in ds:
                raise ValueError(f"{source}: has no 'train' split (splits: {shown_list(names)})")
            if names != ["train"]:
                log.warning(
                    "%s: --split-column none: only its 'train' split is read (and split at random); %s are left out",
                    source,
                    shown_list([n for n in names if n != "train"]),
                )
            return dataset_frame(ds["train"], columns, None, source)
        if unknown:
            raise ValueError(
                f"{source}: split(s) {shown_list(unknown)} are not train, validation (or valid) or test; keep "
                "those three (e.g. DatasetDict({'train': ..., 'test': ...})) or pass one Dataset with a split column"
            )
        parts = []
        for name in names:
            if split_column in ds[name].column_names:
                raise ValueError(
                    f"{source}: split {name!r} already has a column {split_column!r}; the DatasetDict's split names "
                    "would replace it (rename it, or give --split-column another name)"
                )
            part = dataset_frame(ds[name], columns, None, source)
            part[split_column] = name.lower()
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
        frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
        frame.attrs["columns"] = [*parts[0].attrs["columns"], split_column]
        return frame
    present = list(ds.column_names)
    frame = ds.select_columns(_kept(present, columns) or present).to_pandas()  # none wanted: said as missing
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    frame.attrs["columns"] = present
    return frame


def python_frame(data: object, columns: Sequence[str] | None, split_column: str | None) -> pd.DataFrame:
    """Data passed from Python as a frame: a pandas DataFrame, a list of dicts (one per row), or a
    ``datasets.Dataset`` / ``DatasetDict``; rows are numbered from 1."""
    if isinstance(data, pd.DataFrame):
        repeated = [str(name) for name, n in Counter(data.columns).items() if n > 1]
        if repeated:
            raise ValueError(f"the DataFrame has column(s) {shown_list(repeated)} more than once; rename them")
        frame = data.copy()
    elif isinstance(data, (list, tuple)):
        bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
        if bad is not None:
            raise ValueError(f"row {bad + 1} of the data is {type(data[bad]).__name__}, not a dict of column values")
        frame = pd.DataFrame(list(data), dtype=object)
    elif type(data).__module__.startswith("datasets"):
        return dataset_frame(data, columns, split_column, f"<{type(data).__name__}>")
    else:
        raise ValueError(
            f"data must be a corpus name, a pandas DataFrame, a list of dicts or a datasets Dataset / DatasetDict, "
            f"got {type(data).__name__}"
        )
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    frame.attrs["columns"] = [str(c) for c in frame.columns]
    return frame


class Grouped(NamedTuple):
    """A table's documents grouped by task, in order of first appearance: ``docs`` task -> documents; ``splits``
    task -> each document's given split (train / valid / test), None when the table gives none; the format."""

    docs: dict[str, list[Document]]
    splits: dict[str, list[str]] | None
    data_format: str


def documents_by_task(
    frame: pd.DataFrame,
    task_column: str,
    text_column: str,
    source: str,
    data_format: str = "auto",
    split_column: str | None = None,
) -> Grouped:
    """Group a table's documents (:mod:`.formats`: text, prompt-completion or messages) by task.

    Rows with nothing to train on (an empty text or completion, a conversation without an assistant turn)
    are dropped, said in one warning line that names their rows and tasks; a task that has no document left
    is an error that names it (it would otherwise vanish). ``split_column``: where the table has that column,
    each row's split (train, valid or validation, test) is used as given.
    """
    if len(frame) == 0:
        raise ValueError(f"{source}: the table has no rows: no document to train on")
    present = frame.attrs.get("columns", list(frame.columns))
    data_format = detect_format(present, data_format, text_column, source)
    wanted = (task_column, *format_columns(data_format, text_column))
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns present: {shown_list(present, 20)} "
            "(choose them with --task-column / --text-column, or the format with --data-format)"
        )
    names = _task_names(frame, task_column, source)
    documents = parse_examples(frame, data_format, text_column, source)
    empty = np.array([d is None for d in documents], dtype=bool)
    if empty.any():
        _report_empty(frame, names, empty, format_columns(data_format, text_column)[-1], data_format == "text", source)
    if split_column not in (None, "split") and split_column not in present:
        raise ValueError(
            f"{source}: --split-column {split_column!r} is not a column; columns present: {shown_list(present, 20)} "
            "(--split-column none splits at random)"
        )
    given = _given_splits(frame, split_column, source) if split_column and split_column in present else None
    out: dict[str, list[Document]] = {}
    splits: dict[str, list[str]] = {}
    for row, (task, document) in enumerate(zip(names, documents)):
        if document is not None:
            out.setdefault(task, []).append(document)
            if given is not None:
                splits.setdefault(task, []).append(given[row])
    return Grouped(out, splits if given is not None else None, format_name([d for d in documents if d is not None]))


def _given_splits(frame: pd.DataFrame, column: str, source: str) -> list[str]:
    """Every row's split named in ``column``: train, valid (or validation, dev), test (case and surrounding
    spaces ignored); anything else is an error naming the rows."""
    values = frame[column].astype(str).str.strip().str.lower()
    names = values.map(SPLIT_NAMES)
    bad = names.isna().to_numpy()
    if bad.any():
        raise ValueError(
            f"{source}: the {column!r} column holds {shown_list(dict.fromkeys(frame[column][bad].astype(str)))} "
            f"({_where(frame, bad)}); expected train, valid (or validation) or test (--split-column none ignores "
            "the column)"
        )
    return names.tolist()


def _where(frame: pd.DataFrame, mask) -> str:
    """Where the rows of ``mask`` start in the source, e.g. ``line 2, 5`` (the frame's index, see module docstring)."""
    return shown_rows(frame.index[mask], frame.index.name or "row")


def _task_names(frame: pd.DataFrame, task_column: str, source: str) -> pd.Series:
    """Every row's task name, surrounding spaces stripped; a missing or empty name, or two names that differ
    only by surrounding spaces, is an error naming the rows."""
    tasks = frame[task_column]
    raw = tasks.astype(str)
    names = raw.str.strip()
    bad = (tasks.isna() | (names == "")).to_numpy()
    if bad.any():
        raise ValueError(
            f"{source}: {int(bad.sum())} row(s) have an empty or missing {task_column!r} value ({_where(frame, bad)}); "
            "every row needs a task name"
        )
    variants = raw.groupby(names.to_numpy(), sort=False).unique()
    clashes = {name: sorted(spelt) for name, spelt in variants.items() if len(spelt) > 1}
    if clashes:
        raise ValueError(f"{source}: task names that differ only by surrounding spaces: {shown_dict(clashes)}")
    return names


def _report_empty(frame: pd.DataFrame, names: pd.Series, empty, column: str, text: bool, source: str) -> None:
    """Refuse tasks whose every document is empty (naming them and their rows); otherwise warn, in one line,
    which rows were dropped and of which tasks."""
    kept = set(names[~empty])
    emptied = [task for task in dict.fromkeys(names[empty]) if task not in kept]
    what = repr(column)  # the column whose value is empty: the text, the completion or the messages
    if emptied:
        rows = empty & names.isin(emptied).to_numpy()
        hint = f" (every {what} value is empty: is --text-column right?)" if empty.all() and text else ""
        reason = (
            f"have no text: every {what} value of theirs is empty or whitespace-only"
            if text
            else f"have nothing to train on: every {what} value of theirs is empty, or a conversation without an "
            "assistant turn"
        )
        raise ValueError(
            f"{source}: task(s) {shown_list(emptied)} {reason} ({_where(frame, rows)}){hint}; give them text or "
            "remove their rows"
        )
    dropped = (
        "empty or whitespace-only text(s)"
        if text
        else f"row(s) with nothing to train on (an empty {what} value, or a conversation without an assistant turn)"
    )
    log.warning(
        "%s: dropped %d %s (%s) of task(s) %s; each of these tasks keeps other documents",
        source,
        int(empty.sum()),
        dropped,
        _where(frame, empty),
        shown_list(dict.fromkeys(names[empty])),
    )
