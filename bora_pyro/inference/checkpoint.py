"""Training checkpoints: parameters, optimizer state, RNG states, step and history; crash-safe, checksummed.

A checkpoint folder holds one or two *slots* ``step-<STEP>-<ID>/``, each with ``state.safetensors``
(every tensor) and ``state.json`` (everything else plus the SHA-256 of the tensor file). A save
writes a new slot under a temporary name (``.tmp-*``), flushes it to disk, renames it into place
and only then deletes the older slot: a kill at any moment leaves at least one complete slot (or,
before the first save, none), and loading takes the newest complete slot and removes leftovers.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from safetensors.torch import load_file, save_file

from ..io.faults import crash_point
from ..io.folders import fsync_path
from ..io.task_store import TaskStore

CHECKPOINT_FORMAT = "bora_pyro.checkpoint/2"


@dataclass
class LoopState:
    """Where the SVI loop is: last finished step, best validation so far, and the history."""

    step: int = 0
    best_ll: float = -float("inf")
    best_step: int = 0
    bad_evals: int = 0
    losses: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_tokens: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> tuple[dict, torch.Tensor]:
    np_state = np.random.get_state()
    json_state = {"random": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return json_state, torch.get_rng_state()


def _set_rng_state(json_state: dict, torch_state: torch.Tensor) -> None:
    version, internal, gauss = json_state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def _slots(folder: Path) -> list[tuple[int, Path]]:
    """Complete slots (renamed into place), newest first."""
    found = []
    for path in folder.glob("step-*"):
        try:
            found.append((int(path.name.split("-")[1]), path))
        except (IndexError, ValueError):
            continue
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


def _remove_temporaries(folder: Path) -> None:
    for leftover in folder.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def checkpoint_step(folder: Path) -> int | None:
    """The step of the newest complete checkpoint in ``folder`` (None if there is none)."""
    slots = _slots(Path(folder)) if Path(folder).is_dir() else []
    return slots[0][0] if slots else None


def save_checkpoint(
    folder: Path,
    optimizer: torch.optim.Optimizer | None,
    state: LoopState,
    best: dict[str, torch.Tensor],
    fingerprint: dict,
    store: TaskStore | None = None,
) -> None:
    """Write the active param store, ``optimizer`` and ``state`` to a new slot of ``folder``, then drop older slots.

    A disk task ``store``'s tables are not copied: they are flushed, the slot records the store's next
    generation (and the rows the best validated state differs in), and the store then journals the
    writes after this checkpoint (see ``io/task_store.py``)."""
    store = store or TaskStore()
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(folder)
    params = pyro.get_param_store().named_parameters()
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params if not store.holds(p)}
    tensors.update({f"best/{n}": v.cpu().contiguous() for n, v in best.items()})
    best_rows = list(store.best.rows)
    tensors.update({f"bestrow/{i}": store.best.rows[key] for i, key in enumerate(best_rows)})
    rng_json, rng_torch = _rng_state()
    tensors["rng/torch"] = rng_torch
    optim_json = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, slots in sd["state"].items():
            for key, value in slots.items():
                if not store.holds(value):  # a disk store's moments are its own files
                    tensors[f"optim/{idx}/{key}"] = torch.as_tensor(value).cpu().contiguous()
        optim_json = {
            "param_groups": sd["param_groups"],
            "state_keys": {str(i): list(s) for i, s in sd["state"].items()},
        }
    store.flush()  # the tables as of this checkpoint, on disk
    slot_name = f"step-{state.step:08d}-{os.urandom(4).hex()}"
    tmp = folder / f".tmp-{slot_name}"
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    crash_point("checkpoint.tensors-written")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "sha256": _sha256(tmp / "state.safetensors"),
        "fingerprint": fingerprint,
        "loop": state.__dict__,
        "rng": rng_json,
        "optimizer": optim_json,
        "store_generation": store.generation + 1,
        "best_rows": best_rows,
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    for path in (tmp / "state.safetensors", tmp / "state.json", tmp):
        fsync_path(path)
    crash_point("checkpoint.slot-written")
    os.rename(tmp, folder / slot_name)
    fsync_path(folder)
    crash_point("checkpoint.slot-renamed")
    if store.disk:
        store.begin(store.generation + 1)
    for _, old in _slots(folder)[1:]:
        shutil.rmtree(old)


def fingerprint_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def load_checkpoint(
    folder: Path, optimizer: torch.optim.Optimizer | None, fingerprint: dict, store: TaskStore | None = None
) -> tuple[LoopState, dict]:
    """Restore the active param store (in place), ``optimizer`` and RNG states from the newest complete
    slot of ``folder``; returns (state, best). A disk task ``store`` (opened on its files) is rolled back
    to the slot's generation."""
    store = store or TaskStore()
    folder = Path(folder)
    _remove_temporaries(folder)
    slots = _slots(folder) if folder.is_dir() else []
    if not slots:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    slot = slots[0][1]
    try:
        meta = json.loads((slot / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {slot} is corrupted: state.json is missing or not valid JSON ({err})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{slot} is not a checkpoint this version reads (format {meta.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    if _sha256(slot / "state.safetensors") != meta["sha256"]:
        raise ValueError(f"checkpoint {slot} is corrupted: state.safetensors does not match its checksum")
    differing = fingerprint_differences(
        json.loads(json.dumps(meta["fingerprint"])), json.loads(json.dumps(fingerprint))
    )
    if differing:
        raise ValueError(
            f"checkpoint {folder} belongs to a different run: {', '.join(differing[:8])}"
            f"{' ...' if len(differing) > 8 else ''} differ{'s' if len(differing) == 1 else ''}; "
            "resume with the same settings, data and base model"
        )
    tensors = load_file(str(slot / "state.safetensors"))
    if store.disk:
        store.rollback(meta["store_generation"])
        store.begin(meta["store_generation"])
        store.best.rows = {(name, row): tensors[f"bestrow/{i}"] for i, (name, row) in enumerate(meta["best_rows"])}
    with torch.no_grad():
        for name, param in pyro.get_param_store().named_parameters():
            if not store.holds(param):
                param.copy_(tensors[f"param/{name}"])
    best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")}
    if optimizer is not None and meta["optimizer"] is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for i, keys in meta["optimizer"]["state_keys"].items():
            saved = {k: tensors[f"optim/{i}/{k}"] for k in keys if f"optim/{i}/{k}" in tensors}
            held = optimizer.task_state(params[int(i)]) if len(saved) < len(keys) else {}  # a disk store's moments
            state[int(i)] = {k: saved.get(k, held.get(k)) for k in keys}
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    _set_rng_state(meta["rng"], tensors["rng/torch"])
    return LoopState(**meta["loop"]), best
