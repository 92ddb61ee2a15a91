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
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .folders import fsync_path

STORES = ("memory", "disk", "auto")
TABLE_SUFFIX = ".safetensors"
AUTO_DISK_BYTES = 8 * 2**30  # "auto" keeps tables in memory up to this size in all


def table_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _header(shape: tuple[int, ...], nbytes: int) -> bytes:
    """A safetensors header for one float32 tensor ``rows``, padded to a multiple of 8 bytes."""
    header = json.dumps({"rows": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    return header + b" " * (-len(header) % 8)


def open_table(path: Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Memory-map the table file ``path`` (created as zeros of ``shape`` if it does not exist). Writes to
    the returned tensor go to the file."""
    path = Path(path)
    if not path.exists():
        if shape is None:
            raise FileNotFoundError(f"task table {path} not found")
        nbytes = table_bytes(shape)
        header = _header(shape, nbytes)
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
    array = np.memmap(path, dtype=np.float32, mode="r+", offset=8 + length, shape=tuple(meta["shape"]))
    return torch.from_numpy(array)


class TaskStore:
    """Allocates per-task tables ``[D, ...]``: in memory (``"memory"``) or as memory-mapped files in
    ``folder`` (``"disk"``). Tables are created filled with zeros or with a given row.

    Args:
        kind: "memory" or "disk" (see :meth:`choose` for "auto").
        folder: where a disk store keeps its files (one per table, named after it).
    """

    def __init__(self, kind: str = "memory", folder: str | Path | None = None) -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"task store must be 'memory' or 'disk', got {kind!r}")
        if kind == "disk" and folder is None:
            raise ValueError("a disk task store needs a folder for its files")
        self.kind = kind
        self.folder = None if folder is None else Path(folder)
        self.tables: dict[str, torch.Tensor] = {}

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

    def table(self, name: str, shape: tuple[int, ...], fill: torch.Tensor | None = None) -> torch.Tensor:
        """A new table ``name`` of ``shape`` [D, ...], zeros or every row equal to ``fill`` [...] (it replaces a
        table of that name: a new guide or optimizer starts its own)."""
        if self.disk:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.path(name)
            if path.exists():
                path.unlink()  # a leftover of an earlier, unfinished run of this store
            table = open_table(path, tuple(shape))
        else:
            table = torch.zeros(shape)
        if fill is not None and bool((fill != 0).any()):
            for start in range(0, shape[0], 256):  # in chunks: no [D, ...] temporary
                table[start : start + 256] = fill.to(table)
        self.tables[name] = table
        return table

    def flush(self) -> None:
        """Write every disk table's changed rows to its file and flush the files to disk."""
        if not self.disk:
            return
        for name in self.tables:
            path = self.path(name)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())  # the mapped pages are the page cache: fsync writes them out
        fsync_path(self.folder)
