"""Where the per-task tables live: in memory, or in memory-mapped files on disk.

A per-task table is a tensor [D, ...] with one row per task: the MAP guide's task rows and their
AdamW moments. With thousands of tasks they outgrow memory (rank 8 on SmolLM2's q_proj and v_proj is
1.8 MB per task and table: 10,000 tasks are 18 GB, 55 GB with the two moments), while a training step
reads and writes only the rows of its batch's tasks. A disk store keeps each table in a file that is
memory-mapped: the operating system's page cache holds the rows in use, so memory grows with the rows
the steps touch, not with the number of tasks.

A table file is a safetensors file holding one tensor, ``rows``, so safetensors readers (e.g.
``safe_open(...).get_slice("rows")[i]``) read single rows without loading the rest. It starts as a
sparse file of zeros: a row takes disk space once it is written.

A disk store's tables are changed in place, so it keeps two records of the rows a step is about to
overwrite (their values before the first write since a point; :meth:`TaskStore.before_write`): in
memory since the best validated state (to restore it without a copy of every row), and in an undo log
on disk since the last checkpoint (``undo-<generation>.log``, written and flushed before the rows
change): a resumed run rolls the tables back to its checkpoint, whatever moment a kill hit.

The log of the generation before is kept too (a checkpoint folder keeps two slots, and the older one is
the fallback for a damaged newer one): rolling back to generation ``g`` replays the logs of ``g`` and of
every later generation there is, newest first, so each row ends at its value before its first write
since checkpoint ``g``. A rollback that would need a log that is gone is refused
(:meth:`TaskStore.missing_logs`); :meth:`TaskStore.begin` deletes the logs newer than its generation
before its own, so a kill at any moment leaves logs that take the tables back to either kept slot.

A disk store's tables stay in host memory on every device: with the model on an accelerator, a step's rows
are gathered on the host and copied to the device, their gradients copied back, and the optimizer updates
them on the host (a step touches a few tasks' rows: megabytes, not the table). While a step computes, the
next step's rows are read from the disk into the page cache (:meth:`TaskStore.prefetch`).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .faults import crash_point
from .folders import fsync_path, mark
from .integrity import CorruptFile

STORES = ("memory", "disk", "auto")
TABLE_SUFFIX = ".safetensors"
AUTO_DISK_BYTES = 8 * 2**30  # "auto" keeps tables in memory up to this size in all


def table_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _header(name: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """A safetensors header for one float32 tensor ``rows`` (the table's name in the metadata), padded to a
    multiple of 8 bytes."""
    header = json.dumps(
        {"__metadata__": {"table": name}, "rows": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}
    ).encode()
    return header + b" " * (-len(header) % 8)


def table_name(path: Path) -> str:
    """The name of the table stored in the file ``path``."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))["__metadata__"]["table"]


def _map_table(path: Path, shape: tuple[int, ...] | None, name: str) -> tuple[torch.Tensor, _Mapping]:
    path = Path(path)
    if not path.exists():
        if shape is None:
            raise FileNotFoundError(f"task table {path} not found")
        nbytes = table_bytes(shape)
        header = _header(name, shape, nbytes)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + nbytes)  # a sparse file: no disk used until rows are written
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(length))["rows"]
    if shape is not None and tuple(meta["shape"]) != tuple(shape):
        raise ValueError(f"task table {path} has shape {tuple(meta['shape'])}, expected {tuple(shape)}")
    if meta["dtype"] != "F32":
        raise ValueError(f"task table {path} holds {meta['dtype']}, expected F32")
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    # rows are read at random: without this a page fault reads the device's read-ahead window around it
    # (8 MB on a virtio disk), so a step touching 2,880 rows of 18 KB read gigabytes (2-5 s per step)
    mapped.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapped, dtype=np.float32, count=math.prod(meta["shape"]), offset=8 + length)
    return torch.from_numpy(array.reshape(meta["shape"])), _Mapping(mapped, 8 + length)


class _Mapping:
    """A table file's memory map and the byte offset of its first row in it."""

    def __init__(self, mapped: mmap.mmap, offset: int) -> None:
        self.map, self.offset = mapped, offset

    def will_need(self, table: torch.Tensor, rows: list[int]) -> None:
        """Ask the kernel to start reading these rows of ``table`` (this file's tensor [D, ...]) into the page
        cache (``madvise(MADV_WILLNEED)``: it returns before the reads finish)."""
        row_bytes = table[0].numel() * table.element_size()
        for row in rows:
            start = self.offset + row * row_bytes
            aligned = start - start % mmap.PAGESIZE
            self.map.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)


class RowJournal:
    """The values of some tables' rows before their first write since the journal was cleared, in memory."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    def record(self, tables: dict[str, torch.Tensor], rows: list[int]) -> None:
        for name, table in tables.items():
            for row in rows:
                if (name, row) not in self.rows:
                    self.rows[name, row] = table[row].clone()

    @torch.no_grad()
    def restore(self, tables: dict[str, torch.Tensor]) -> None:
        """Write the recorded values back (the tables as they were when the journal was cleared)."""
        for (name, row), value in self.rows.items():
            tables[name][row] = value
        self.rows.clear()


CREATED = 2**64 - 1  # the row number of an undo-log entry that records a table's creation


class UndoLog:
    """A :class:`RowJournal` on disk, appended to and flushed before the rows change (write-ahead): entries
    of (table name, row, the row's float32 values), or (table name, :data:`CREATED`) for a table created
    since the checkpoint (undone by deleting it); a torn last entry (a kill while appending, before the
    change) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path, self.logged = path, set()
        self._file = open(path, "ab")

    def record(self, tables: dict[str, torch.Tensor], rows: list[int]) -> None:
        new = [(name, row) for name in tables for row in rows if (name, row) not in self.logged]
        for name, row in new:
            data = tables[name][row].contiguous().numpy().tobytes()
            key = name.encode()
            self._file.write(struct.pack("<IQQ", len(key), row, len(data)) + key + data)
            self.logged.add((name, row))
        if new:
            self._file.flush()
            os.fsync(self._file.fileno())
            crash_point("store.rows-journaled")

    def record_created(self, name: str) -> None:
        key = name.encode()
        self._file.write(struct.pack("<IQQ", len(key), CREATED, 0) + key)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def entries(path: Path) -> list[tuple[str, int, bytes]]:
        """The entries (table name, row, values) of the log ``path``, in the order they were written."""
        data, entries, offset = Path(path).read_bytes(), [], 0
        while offset + 20 <= len(data):
            key_len, row, size = struct.unpack_from("<IQQ", data, offset)
            end = offset + 20 + key_len + size
            if end > len(data):
                break  # torn by a kill while appending: its row was not changed yet
            name = data[offset + 20 : offset + 20 + key_len].decode()
            entries.append((name, row, data[offset + 20 + key_len : end]))
            offset = end
        return entries

    @staticmethod
    @torch.no_grad()
    def replay(paths: list[Path], tables: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
        """Write the values logged in ``paths`` (the logs of consecutive generations, oldest first) back into
        ``tables``, last entries first; returns the rows restored and the tables created since the first
        log's checkpoint (for the caller to delete: their rows are not restored)."""
        entries = [entry for path in paths for entry in UndoLog.entries(path)]
        created = {name for name, row, _ in entries if row == CREATED}
        restored = 0
        for name, row, values in reversed(entries):
            if row != CREATED and name not in created:
                table = tables[name]
                table[row] = torch.frombuffer(bytearray(values), dtype=torch.float32).view(table.shape[1:])
                restored += 1
        return restored, sorted(created)


class TaskStore:
    """Allocates per-task tables ``[D, ...]``: in memory (``"memory"``) or as memory-mapped files in
    ``folder`` (``"disk"``). Tables are created filled with zeros or with a given row.

    Args:
        kind: "memory" or "disk" (see :meth:`choose` for "auto").
        folder: where a disk store keeps its files (one per table, named after it).
        reopen: a disk store's tables are the files already in ``folder``, with their values (a fitted run
            folder's ``task_store/``); otherwise a table starts anew.
    """

    def __init__(self, kind: str = "memory", folder: str | Path | None = None, reopen: bool = False) -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"task store must be 'memory' or 'disk', got {kind!r}")
        if kind == "disk" and folder is None:
            raise ValueError("a disk task store needs a folder for its files")
        self.kind, self.reopen = kind, reopen
        self.folder = None if folder is None else Path(folder)
        self.tables: dict[str, torch.Tensor] = {}
        self._maps: dict[str, _Mapping] = {}
        self.best = RowJournal()  # the guide's rows as they were at the best validated state
        self.generation = 0  # of the undo log: checkpoints made
        self.undo: UndoLog | None = None

    @staticmethod
    def choose(kind: str, needed_bytes: int) -> str:
        """``"auto"``: "disk" when the tables need more than :data:`AUTO_DISK_BYTES`, else "memory"."""
        if kind not in STORES:
            raise ValueError(f"task store must be one of {STORES}, got {kind!r}")
        return kind if kind != "auto" else ("disk" if needed_bytes > AUTO_DISK_BYTES else "memory")

    @property
    def disk(self) -> bool:
        return self.kind == "disk"

    def path(self, name: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + TABLE_SUFFIX)

    def table(
        self, name: str, shape: tuple[int, ...], fill: torch.Tensor | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """A new table ``name`` of ``shape`` [D, ...], zeros or every row equal to ``fill`` [...] (it replaces a
        table of that name: a new guide or optimizer starts its own), on ``device`` (the parameters' device).
        A disk store's tables stay in host memory whatever the device: the model gathers a step's rows and
        copies them to its device (``guides.gather_rows``), and the optimizer updates them on the host."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self.disk:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True)
                mark(self.folder, "store")
            path = self.path(name)
            if self.reopen and path.exists():
                self.tables[name], self._maps[name] = _map_table(path, tuple(shape), name)
                return self.tables[name]
            if path.exists():
                path.unlink()  # a leftover of an earlier, unfinished run of this store
            if self.undo is not None:
                self.undo.record_created(name)
            table, self._maps[name] = _map_table(path, tuple(shape), name)
        else:
            table = torch.zeros(shape, device=device)
        if fill is not None and bool((fill != 0).any()):
            with torch.no_grad():
                for start in range(0, shape[0], 256):  # in chunks: no [D, ...] temporary
                    table[start : start + 256] = fill.to(table)
        self.tables[name] = table
        return table

    def guide_tables(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.tables.items() if n.startswith("guide.")}

    def before_write(self, rows: torch.Tensor) -> None:
        """Record the rows ``rows`` of every table before a step overwrites them (see the module docstring)."""
        if not self.disk:
            return
        ids = [int(r) for r in rows]
        self.best.record(self.guide_tables(), ids)
        if self.undo is not None:
            self.undo.record(self.tables, ids)

    def _undo_path(self, generation: int) -> Path:
        return self.folder / f"undo-{generation}.log"

    def _undo_logs(self) -> dict[int, Path]:
        """The undo logs in the store's folder, by generation."""
        logs = {}
        for path in self.folder.glob("undo-*.log"):
            with contextlib.suppress(ValueError):
                logs[int(path.name[len("undo-") : -len(".log")])] = path
        return logs

    def missing_logs(self, generation: int) -> list[Path]:
        """The undo logs that rolling back to checkpoint ``generation`` needs and that are gone: those of it and
        of every later generation up to the newest log there is (none if that is older: the tables hold the
        checkpoint's state, flushed before it was put in place)."""
        logs = self._undo_logs()
        return [self._undo_path(g) for g in range(generation, max(logs, default=-1) + 1) if g not in logs]

    def begin(self, generation: int) -> None:
        """Start journaling the writes after checkpoint ``generation`` (the tables hold its state). The log of
        the generation before stays (the older checkpoint slot rolls back through it); every other log is
        deleted, newest first, so a kill half-way never leaves a newer log without this generation's old one."""
        self.close()
        self.generation = generation
        for g, path in sorted(self._undo_logs().items(), reverse=True):
            if g != generation - 1:
                path.unlink()
        self.undo = UndoLog(self._undo_path(generation))
        fsync_path(self.folder)

    def rollback(self, generation: int) -> int:
        """Undo the writes made after checkpoint ``generation`` (from the undo logs of it and of every later
        generation, newest first); returns the rows restored. Refused if a log it needs is gone."""
        missing = self.missing_logs(generation)
        if missing:
            raise CorruptFile(
                f"cannot roll the task tables in {self.folder} back to checkpoint generation {generation}: "
                f"{', '.join(p.name for p in missing)} {'is' if len(missing) == 1 else 'are'} gone"
            )
        for file in self.folder.glob(f"*{TABLE_SUFFIX}"):  # tables not opened yet (e.g. moments) roll back too
            name = table_name(file)
            if name not in self.tables:
                self.tables[name], self._maps[name] = _map_table(file, None, name)
        logs = [path for g, path in sorted(self._undo_logs().items()) if g >= generation]
        restored, created = UndoLog.replay(logs, self.tables)
        for name in created:  # it did not exist at the checkpoint (nor since a rollback killed half-way)
            self.tables.pop(name, None)
            self._maps.pop(name, None)
            self.path(name).unlink(missing_ok=True)
        self.flush()
        return restored

    def close(self) -> None:
        """Stop journaling (the run is over: its tables are only read from now on)."""
        if self.undo is not None:
            self.undo.close()
            self.undo = None

    def release(self) -> None:
        """Drop the table pages this process has mapped in (``madvise(MADV_DONTNEED)``; what was written
        stays in the page cache and goes to the files): memory holds the rows a step uses, not all the
        rows steps have touched. Called after each optimizer step."""
        for mapping in self._maps.values():
            mapping.map.madvise(mmap.MADV_DONTNEED)

    def prefetch(self, rows: torch.Tensor | None) -> None:
        """Start reading the rows ``rows`` ([P] task ids) of every disk table from the disk while the current
        step computes: a training step calls it with the next step's tasks, whose rows are then in the page
        cache when that step reads them (a memory store, or None for every task: nothing to read ahead)."""
        if not self.disk or rows is None:
            return
        ids = [int(r) for r in rows]
        for name, mapping in self._maps.items():
            mapping.will_need(self.tables[name], ids)

    def holds(self, tensor: torch.Tensor) -> bool:
        """True if ``tensor`` is (a view of the whole of) one of this disk store's tables."""
        return self.disk and any(tensor.data_ptr() == t.data_ptr() for t in self.tables.values())

    def link_into(self, folder: Path) -> None:
        """Hard-link every table file into ``folder`` (no copy; the tables stay mapped)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.tables:
            os.link(self.path(name), folder / self.path(name).name)

    def flush(self) -> None:
        """Write every disk table's changed rows to its file and flush the files to disk."""
        if not self.disk:
            return
        for name in self.tables:
            path = self.path(name)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())  # the mapped pages are the page cache: fsync writes them out
        fsync_path(self.folder)
