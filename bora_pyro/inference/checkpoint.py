"""Training checkpoints: parameters, optimizer state, RNG states, step and history; atomic, checksummed.

A checkpoint is a folder with ``state.safetensors`` (every tensor) and ``state.json`` (everything
else plus the SHA-256 of the tensor file). Both are written to temporary names and renamed, the JSON
last, so a crash mid-write leaves the previous checkpoint readable. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = "bora_pyro.checkpoint/1"


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
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def save_checkpoint(folder: Path, optimizer: torch.optim.Optimizer | None, state: LoopState,
                    best: dict[str, torch.Tensor], fingerprint: dict) -> None:
    """Write the active param store, ``optimizer`` and ``state`` to ``folder`` (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    store = pyro.get_param_store()
    tensors = {f"param/{n}": store._params[n].detach().cpu().contiguous() for n in store.keys()}
    tensors.update({f"best/{n}": v.cpu().contiguous() for n, v in best.items()})
    rng_json, rng_torch = _rng_state()
    tensors["rng/torch"] = rng_torch
    optim_json = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, slots in sd["state"].items():
            for key, value in slots.items():
                tensors[f"optim/{idx}/{key}"] = torch.as_tensor(value).cpu().contiguous()
        optim_json = {"param_groups": sd["param_groups"], "state_keys": {str(i): list(s) for i, s in sd["state"].items()}}
    tmp_tensors = folder / "state.safetensors.tmp"
    save_file(tensors, str(tmp_tensors))
    os.replace(tmp_tensors, folder / "state.safetensors")
    meta = {"format": CHECKPOINT_FORMAT, "sha256": _sha256(folder / "state.safetensors"), "fingerprint": fingerprint,
            "constraints": {n: repr(c) for n, c in store._constraints.items()},
            "loop": state.__dict__, "rng": rng_json, "optimizer": optim_json}
    tmp_json = folder / "state.json.tmp"
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp_json, folder / "state.json")


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer | None, fingerprint: dict) -> tuple[LoopState, dict]:
    """Restore the active param store (in place), ``optimizer`` and RNG states; returns (state, best)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {folder} (state.json missing)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {folder} is corrupted: state.json is not valid JSON ({err})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder} is not a bora_pyro checkpoint (format {meta.get('format')!r})")
    if _sha256(folder / "state.safetensors") != meta["sha256"]:
        raise ValueError(f"checkpoint {folder} is corrupted: state.safetensors does not match its checksum")
    if meta["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {folder} belongs to a different run configuration; resume with the same settings")
    tensors = load_file(str(folder / "state.safetensors"))
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in store.keys():
            store._params[name].copy_(tensors[f"param/{name}"])
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    if optimizer is not None and meta["optimizer"] is not None:
        state = {int(i): {k: tensors[f"optim/{i}/{k}"] for k in keys} for i, keys in meta["optimizer"]["state_keys"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    _set_rng_state(meta["rng"], tensors["rng/torch"])
    return LoopState(**meta["loop"]), best
