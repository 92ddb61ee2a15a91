"""Training checkpoints: parameters, optimizer state, RNG states, step and history; crash-safe, checksummed.

A checkpoint folder holds the newest :data:`KEEP_SLOTS` (two) *slots* ``step-<STEP>-<ID>/``, each with
``state.safetensors`` (every tensor) and ``state.json`` (everything else, the SHA-256 of the tensor file
and the SHA-256 of its own other fields). A save writes a new slot under a temporary name (``.tmp-*``),
flushes it to disk, renames it into place and only then deletes the slots older than the two newest:
a kill at any moment leaves at least one complete slot (or, before the first save, none).

Loading removes leftovers and takes the newest *intact* slot: a slot whose ``state.json`` is missing,
not JSON, of another format or without its checksums, or whose files do not match them, is passed over
for the older one with a warning naming the damaged slot, why, and the step resumed from (the damaged
slot is then deleted); when no slot is intact the error names each slot's problem. With a disk task
store the older slot is one more undo-log generation back (see ``io/task_store.py``). No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
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
from ..io.integrity import CorruptFile, json_digest, sha256_file
from ..io.task_store import TaskStore

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "bora_pyro.checkpoint/3"  # 3: state.json carries the digest of its own fields
KEEP_SLOTS = 2  # a damaged newest slot falls back to the one before


@dataclass
class LoopState:
    """Where the SVI loop is: last finished step, best validation so far, and the history. ``losses``: one row per
    step {"step", "loss_per_token", "train_nll_per_token", "train_ppl", "prior_per_token", "grad_norm" (before
    clipping), "lr"}; ``evals``: one per validation {"step", "valid_ppl", "valid_macro_ppl",
    "valid_loglik_per_token"}."""

    step: int = 0
    best_ll: float = -float("inf")
    best_step: int = 0
    bad_evals: int = 0
    losses: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per second of training time (NaN before the first step)."""
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


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


def _fields_digest(meta: dict) -> str:
    """The SHA-256 of the fields of ``state.json`` but this digest itself (see ``integrity.json_digest``)."""
    return json_digest({key: value for key, value in meta.items() if key != "json_sha256"})


def _checked_meta(slot: Path) -> dict:
    """The ``state.json`` of ``slot``, checked against its own digest, with ``state.safetensors`` checked against
    the digest in it; raises :class:`CorruptFile` saying what is wrong."""
    try:
        meta = json.loads((slot / "state.json").read_text())
    except FileNotFoundError:
        raise CorruptFile("state.json is missing") from None
    except (OSError, ValueError) as err:
        raise CorruptFile(f"state.json is not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CorruptFile("state.json is not a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFile(f"its format is {meta.get('format')!r}, this version reads {CHECKPOINT_FORMAT!r}")
    for key, what in (("sha256", "the digest of state.safetensors"), ("json_sha256", "the digest of its fields")):
        if not isinstance(meta.get(key), str):
            raise CorruptFile(f"state.json has no {key!r} ({what})")
    if meta["json_sha256"] != _fields_digest(meta):
        raise CorruptFile("state.json does not match its checksum")
    try:
        digest = sha256_file(slot / "state.safetensors")
    except FileNotFoundError:
        raise CorruptFile("state.safetensors is missing") from None
    except OSError as err:
        raise CorruptFile(f"state.safetensors is not readable ({err})") from None
    if digest != meta["sha256"]:
        raise CorruptFile("state.safetensors does not match its checksum")
    return meta


def _check_rollback(store: TaskStore, meta: dict) -> None:
    """A disk ``store`` can roll its tables back to the slot of ``meta``: the undo logs it needs are there."""
    missing = store.missing_logs(meta["store_generation"]) if store.disk else []
    if missing:
        raise CorruptFile(
            f"the task store's undo log{'s' if len(missing) > 1 else ''} {', '.join(p.name for p in missing)} "
            f"(to roll its tables back to this slot) {'are' if len(missing) > 1 else 'is'} gone"
        )


def _newest_intact(folder: Path, store: TaskStore | None = None) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest intact slot of ``folder`` (and one a disk ``store`` can roll back to), its metadata, and the
    newer slots passed over, each with its problem. Raises FileNotFoundError if ``folder`` holds no slot,
    :class:`CorruptFile` naming each slot's problem if none is intact."""
    passed = []
    for _, slot in _slots(folder):
        try:
            meta = _checked_meta(slot)
            if store is not None:
                _check_rollback(store, meta)
        except CorruptFile as err:
            passed.append((slot, str(err)))
            continue
        return slot, meta, passed
    if not passed:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    problems = "; ".join(f"{slot.name}: {why}" for slot, why in passed)
    raise CorruptFile(
        f"no intact checkpoint in {folder} to resume from ({problems}); start the run again with --overwrite"
    )


def checkpoint_step(folder: Path) -> int | None:
    """The step of the newest intact checkpoint in ``folder`` (None if it holds no checkpoint); raises
    :class:`CorruptFile` naming each slot's problem if it holds slots but none is intact."""
    folder = Path(folder)
    if not folder.is_dir() or not _slots(folder):
        return None
    return _newest_intact(folder)[1]["loop"]["step"]


def _drop_damaged(slot: Path, meta: dict, passed: list[tuple[Path, str]]) -> None:
    """Say that the newer slots ``passed`` are damaged and that ``slot`` is resumed instead, and delete them: a
    slot saved from here on must not rank below one of them."""
    damaged = "; ".join(f"{path} ({why})" for path, why in passed)
    log.warning(
        "damaged checkpoint slot%s %s: resuming from the older slot %s at step %d instead (the damaged one%s deleted)",
        "s" if len(passed) > 1 else "",
        damaged,
        slot.name,
        meta["loop"]["step"],
        "s are" if len(passed) > 1 else " is",
    )
    for path, _ in passed:
        shutil.rmtree(path)


def save_checkpoint(
    folder: Path,
    optimizer: torch.optim.Optimizer | None,
    state: LoopState,
    best: dict[str, torch.Tensor],
    fingerprint: dict,
    store: TaskStore | None = None,
) -> None:
    """Write the active param store, ``optimizer`` and ``state`` to a new slot of ``folder``, then drop the slots
    older than the :data:`KEEP_SLOTS` newest.

    A disk task ``store``'s tables are not copied: they are flushed, the slot records the store's next
    generation (and the rows the best validated state differs in), and the store then journals the
    writes after this checkpoint, keeping the log of the generation before for the older slot (see
    ``io/task_store.py``). The older slot is dropped first: no slot outlives the undo logs it needs."""
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
        "sha256": sha256_file(tmp / "state.safetensors"),
        "fingerprint": fingerprint,
        "loop": state.__dict__,
        "rng": rng_json,
        "optimizer": optim_json,
        "store_generation": store.generation + 1,
        "best_rows": best_rows,
    }
    meta = json.loads(json.dumps(meta))  # as it reads back (tuples as lists, keys as strings)
    (tmp / "state.json").write_text(json.dumps({**meta, "json_sha256": _fields_digest(meta)}))
    for path in (tmp / "state.safetensors", tmp / "state.json", tmp):
        fsync_path(path)
    crash_point("checkpoint.slot-written")
    os.rename(tmp, folder / slot_name)
    fsync_path(folder)
    crash_point("checkpoint.slot-renamed")
    for _, old in _slots(folder)[KEEP_SLOTS:]:
        shutil.rmtree(old)
    if store.disk:
        store.begin(store.generation + 1)


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
    """Restore the active param store (in place), ``optimizer`` and RNG states from the newest intact slot of
    ``folder``; returns (state, best). A damaged newer slot is passed over with a warning and deleted (see the
    module docstring). A disk task ``store`` (opened on its files) is rolled back to the slot's generation."""
    store = store or TaskStore()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint in {folder}")
    _remove_temporaries(folder)
    slot, meta, passed = _newest_intact(folder, store)
    differing = fingerprint_differences(meta["fingerprint"], json.loads(json.dumps(fingerprint)))
    if differing:
        raise ValueError(
            f"checkpoint {folder} belongs to a different run: {', '.join(differing[:8])}"
            f"{' ...' if len(differing) > 8 else ''} differ{'s' if len(differing) == 1 else ''}; "
            "resume with the same settings, data and base model"
        )
    if passed:
        _drop_damaged(slot, meta, passed)
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
