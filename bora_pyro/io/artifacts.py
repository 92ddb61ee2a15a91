"""Run-folder files: JSON configs and metrics, safetensors adapters, each written atomically.

Nothing here uses pickle: tensors go to safetensors, everything else to JSON/CSV.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .folders import atomic_write
from .integrity import CorruptFile

ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_FORMAT = "bora_pyro.adapters/1"
RUN_FORMAT = 1  # bump when a run folder written by an older version can no longer be read


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: floats inf/nan are written as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from our JSON files (tuples become lists, inf becomes "inf")."""
    return json.loads(json.dumps(_jsonable(value)))


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON, atomically (a reader sees the old file or the new one)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(value), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {Path(path).parent} a bora_pyro run folder?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


TaskChunks = Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]]  # (task ids [P], name -> [P, ...])


def save_adapters(
    path: Path,
    tasks: Sequence[str],
    task_factors: Mapping[str, torch.Tensor] | TaskChunks,
    global_factors: Mapping[str, torch.Tensor] | None,
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Write stacked task factors (``task.<name>`` [D, ...]) and Theta (``global.<name>``) as safetensors.

    ``task_factors``: every task's factors (name -> [D, ...]), or chunks of tasks (task ids, name ->
    [P, ...]; with ``shapes``, name -> per-task shape), written as they come: the file is written
    piece by piece, and never all D adapters are in memory at once.
    """
    if isinstance(task_factors, Mapping):
        shapes = {k: tuple(v.shape[1:]) for k, v in task_factors.items()}
        task_factors = [(torch.arange(len(tasks)), task_factors)]
    float_bytes = 4
    entries, offset = {}, 0
    for key, shape in sorted(
        [(f"task.{k}", (len(tasks), *s)) for k, s in shapes.items()]
        + [(f"global.{k}", tuple(v.shape)) for k, v in (global_factors or {}).items()]
    ):
        size = math.prod(shape) * float_bytes
        entries[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    meta = {"format": ADAPTERS_FORMAT, "tasks": json.dumps(list(tasks))}
    meta.update({k: json.dumps(_jsonable(v)) for k, v in metadata.items()})
    header = json.dumps({"__metadata__": meta, **entries}).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(start + offset)
        for k, v in (global_factors or {}).items():
            f.seek(start + entries[f"global.{k}"]["data_offsets"][0])
            f.write(_float_bytes(v))
        for ids, chunk in task_factors:
            first = int(ids[0])
            if not torch.equal(ids.cpu(), torch.arange(first, first + len(ids))):
                raise ValueError("task chunks must hold consecutive task ids")
            for k, v in chunk.items():
                row = math.prod(shapes[k]) * float_bytes
                f.seek(start + entries[f"task.{k}"]["data_offsets"][0] + first * row)
                f.write(_float_bytes(v))


def _float_bytes(value: torch.Tensor) -> bytes:
    return value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


class AdapterFile:
    """A saved adapters file read row by row: the tasks' factors are read for the tasks asked for only
    (safetensors slices of a memory-mapped file), so a run of many tasks never loads all of them."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} not found") from None
        except Exception as err:
            raise CorruptFile(f"{self.path} is not a readable safetensors file ({err})") from None
        meta = self._file.metadata() or {}
        if meta.get("format") != ADAPTERS_FORMAT:
            raise CorruptFile(
                f"{self.path} is not a bora_pyro adapter file (format {meta.get('format')!r}, "
                f"expected {ADAPTERS_FORMAT!r})"
            )
        self.tasks: list[str] = json.loads(meta["tasks"])
        self.metadata = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "tasks")}
        keys = list(self._file.keys())
        self.names = [k[len("task.") :] for k in keys if k.startswith("task.")]
        self.shapes = {n: tuple(self._file.get_slice(f"task.{n}").get_shape()[1:]) for n in self.names}
        self._global = [k[len("global.") :] for k in keys if k.startswith("global.")]

    def rows(self, tasks: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The factors of ``tasks`` (task ids). Shapes: -> name -> [P, ...]."""
        ids = [int(t) for t in tasks]
        rows = {n: torch.stack([self._file.get_slice(f"task.{n}")[i] for i in ids]) for n in self.names}
        for name, value in rows.items():
            bad = ~torch.isfinite(value).flatten(1).all(dim=1)  # [P]
            if bool(bad.any()):
                task = self.tasks[ids[int(bad.nonzero()[0])]]
                raise CorruptFile(f"{self.path}: the factor {name!r} of task {task!r} holds non-finite values")
        return rows

    def global_factors(self) -> dict[str, torch.Tensor] | None:
        """Theta (None if the run has none). Shapes: name -> [...]."""
        theta = {n: self._file.get_tensor(f"global.{n}") for n in self._global}
        for name, value in theta.items():
            if not bool(torch.isfinite(value).all()):
                raise CorruptFile(f"{self.path}: the global factor (Theta) {name!r} holds non-finite values")
        return theta or None


def load_adapters(path: Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """Read :func:`save_adapters` output whole: (tasks, task factors [D, ...], Theta or None, metadata).
    For many tasks read rows as needed instead (:class:`AdapterFile`)."""
    adapters = AdapterFile(path)
    tensors = load_file(str(path))
    task = {k[len("task.") :]: v for k, v in tensors.items() if k.startswith("task.")}
    return adapters.tasks, task, adapters.global_factors(), adapters.metadata
