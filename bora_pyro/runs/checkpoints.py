"""Where a run may be written, and what lies beside it while it trains.

:func:`claim_run_folder` makes the one decision of whether a run may be written at ``RUN`` (``--overwrite``, an
interrupted run there, an earlier run's checkpoint) before anything is loaded. Beside the run folder live
``RUN.checkpoint``, ``RUN.store`` and ``RUN.tensorboard`` (:func:`beside`); the checkpoint's lifecycle: what it
must match to be resumed (the run's fingerprint), started for a fresh run, removed once the run is complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..data.corpus import Corpus
from ..inference.checkpoint import checkpoint_step, fingerprint_differences
from ..inference.config import WATCH_ONLY
from ..io.artifacts import json_roundtrip, read_json, write_json
from ..io.folders import atomic_folder, check_target, folder_kind, remove_ours, why_not_ours
from ..io.integrity import CorruptFile
from ..io.task_store import TABLE_SUFFIX
from .run_files import INTERRUPTED, TRAINED, read_status, run_entries
from .spec import RunSpec

CHECKPOINT_ENTRIES = ("step-*", ".tmp-*")  # a checkpoint folder's slots, written after its manifest
STORE_ENTRIES = (f"*{TABLE_SUFFIX}", "undo-*.log")  # a disk task store's tables and undo logs


BESIDE = {  # the folders next to a run while it trains, and the entries of each that are the tool's
    "checkpoint": CHECKPOINT_ENTRIES,  # --checkpoint-every's slots
    "store": STORE_ENTRIES,  # a disk task store's table files
    "tensorboard": (),  # --report-to tensorboard's event files, by default
}


def beside(run: str | Path, kind: str) -> Path:
    """``RUN.<kind>`` next to the run folder, for a kind of :data:`BESIDE` (the run folder itself appears only
    when the run is complete)."""
    if kind not in BESIDE:
        raise ValueError(f"a folder beside a run is one of {tuple(BESIDE)}, got {kind!r}")
    run = Path(run)
    return run.parent / f"{run.name}.{kind}"


def checkpoint_folder(run: str | Path) -> Path:
    """Where a run keeps its checkpoints while it trains: ``RUN.checkpoint`` next to it."""
    return beside(run, "checkpoint")


def remove_beside(run: str | Path, kind: str) -> bool:
    """Delete ``RUN.<kind>`` if it holds only what the tool wrote there (else leave it, saying why)."""
    return remove_ours(beside(run, kind), kind, BESIDE[kind])


def run_fingerprint(spec: RunSpec, corpus: Corpus, base_model: dict) -> dict:
    """What a run's checkpoint must match to be resumed: every setting of its spec that changes the result, the
    tokenised corpus and the base model's weights."""
    settings = spec.to_dict()
    for key in ("device", "trust_remote_code"):
        settings.pop(key)
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in WATCH_ONLY}
    return json_roundtrip(
        {
            "settings": settings,
            "corpus_sha256": corpus.content_sha256(),
            "base_weights_sha256": base_model["weights_sha256"],
        }
    )


def fingerprint_id(fingerprint: dict) -> str:
    """A short digest of a fingerprint, recorded in status.json to tell a run's own checkpoint from another's."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunTarget:
    """The decision that a run may be written at ``out``: ``replace`` (a folder there is replaced: --overwrite,
    or the run's own when it is resumed) and ``sources`` (the folders it is made from, never replaced). The write
    verifies it again under the folder's lock (:func:`~bora_pyro.io.folders.atomic_folder`): the folder may have
    changed while the run trained."""

    out: Path
    replace: bool
    sources: tuple[Path, ...] = ()


def claim_run_folder(out: Path, overwrite: bool, resume: bool = False, sources: tuple[Path, ...] = ()) -> RunTarget:
    """May a run be written at ``out``? A resumed run replaces its own folder; a fresh one refuses a folder holding
    an interrupted run (continue it with --resume), one it may not replace (:func:`check_target`) and an earlier
    run's checkpoint beside it (discarded with ``overwrite``). Raises FileExistsError saying why."""
    if not resume:
        _refuse_resumable(out, overwrite)
        check_target(out, overwrite, "run", run_entries(out), sources)
        _refuse_earlier_checkpoint(out, overwrite)
    return RunTarget(out, overwrite or resume, tuple(sources))


def _refuse_earlier_checkpoint(out: Path, overwrite: bool) -> None:
    """A fresh run never continues an earlier run's checkpoint: refuse, or with ``overwrite`` discard it."""
    folder = checkpoint_folder(out)
    if not folder.exists():
        return
    if not overwrite:
        try:
            step = checkpoint_step(folder)
            held = f"a checkpoint at step {step}" if step is not None else "the settings"
        except CorruptFile:
            held = "a damaged checkpoint"
        raise FileExistsError(
            f"{folder} holds {held} of an earlier run of {str(out)!r}: continue it with "
            f"'bora-pyro train --resume {out}', or pass --overwrite to discard it"
        )
    if not remove_beside(out, "checkpoint"):
        raise FileExistsError(
            f"{folder} cannot be discarded: {why_not_ours(folder, 'checkpoint', CHECKPOINT_ENTRIES)}; move it "
            f"away to train into {str(out)!r}"
        )


def start_checkpoints(out: Path, spec: RunSpec, fingerprint: dict, resume: bool) -> Path:
    """The checkpoint folder of a run: created (with the spec, atomically) for a fresh run; for a resumed
    one, checked against what it was started with (a difference is named)."""
    folder = checkpoint_folder(out)
    if resume:
        differing = fingerprint_differences(read_json(folder / "fingerprint.json"), fingerprint)
        if differing:
            raise ValueError(
                f"cannot resume {str(out)!r}: {', '.join(differing[:8])} changed since it was started "
                "(the data, the base model or a setting); train it again instead"
            )
        return folder
    with atomic_folder(folder, "checkpoint") as tmp:
        write_json(tmp / "spec.json", spec.to_dict())
        write_json(tmp / "fingerprint.json", fingerprint)
    return folder


def _refuse_resumable(out: Path, overwrite: bool) -> None:
    """A folder holding an interrupted run is continued with --resume, not silently restarted."""
    if overwrite or not out.is_dir() or folder_kind(out) != "run":
        return
    with contextlib.suppress(FileNotFoundError, ValueError):
        status = read_status(out)["status"]
        if status in (INTERRUPTED, TRAINED):
            raise FileExistsError(
                f"{str(out)!r} holds a run marked {status}: continue it with "
                f"'bora-pyro train --resume {out}', or pass --overwrite to train it again"
            )
