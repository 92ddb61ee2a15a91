"""Run-folder files: JSON configs and metrics, safetensors adapters, each written atomically.

Nothing here uses pickle: tensors go to safetensors, everything else to JSON/CSV.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .folders import atomic_write

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


def save_adapters(
    path: Path,
    tasks: Sequence[str],
    task_factors: Mapping[str, torch.Tensor],
    global_factors: Mapping[str, torch.Tensor] | None,
    metadata: Mapping[str, Any],
) -> None:
    """Write stacked task factors (``task.<name>`` [D, ...]) and Theta (``global.<name>``)."""
    tensors = {f"task.{k}": v.detach().cpu().contiguous() for k, v in task_factors.items()}
    if global_factors is not None:
        tensors.update({f"global.{k}": v.detach().cpu().contiguous() for k, v in global_factors.items()})
    meta = {"format": ADAPTERS_FORMAT, "tasks": json.dumps(list(tasks))}
    meta.update({k: json.dumps(_jsonable(v)) for k, v in metadata.items()})
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_adapters(path: Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """Read :func:`save_adapters` output: (tasks, task factors, Theta or None, metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if meta.get("format") != ADAPTERS_FORMAT:
        raise ValueError(
            f"{path} is not a bora_pyro adapter file (format {meta.get('format')!r}, expected {ADAPTERS_FORMAT!r})"
        )
    tensors = load_file(str(path))
    tasks = json.loads(meta["tasks"])
    task = {k[len("task.") :]: v for k, v in tensors.items() if k.startswith("task.")}
    glob = {k[len("global.") :]: v for k, v in tensors.items() if k.startswith("global.")} or None
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "tasks")}
    return tasks, task, glob, extra
