"""Continuing a run: from its checkpoint after an interruption (``train --resume``), or scoring a run whose
fit was written but whose scoring did not finish."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..io.artifacts import read_json
from ..io.folders import folder_lock, recover, resolve
from ..io.task_store import TaskStore
from .build import build_model, load_inputs
from .checkpoints import checkpoint_folder, fingerprint_id, remove_beside
from .run_files import (
    COMPLETE,
    CONFIG_FILE,
    DIVERGED,
    INTERRUPTED,
    TASK_STORE_FOLDER,
    TRAINED,
    check_base_model,
    fit_state,
    read_metrics,
    verified_status,
    write_scores,
)
from .spec import RunSpec
from .train import run_title, score_fitted, train_run, writer

log = logging.getLogger(__name__)


def complete_run(path: str | Path, trust_remote_code: bool = False, device: str | None = None) -> dict:
    """Score a run folder marked ``trained`` (its scoring failed or was interrupted) and mark it complete;
    returns its metrics (a complete run's as they are)."""
    path = resolve(path, "run folder")
    with folder_lock(path):
        status = verified_status(path)["status"]
        if status == COMPLETE:
            return read_metrics(path)
        if status != TRAINED:
            raise ValueError(f"{path} is marked {status}: only a run marked trained can be completed")
        spec = RunSpec.from_run_folder(path, trust_remote_code)
        spec = spec if device is None else replace(spec, device=device)
        lm, _, identity, corpus = load_inputs(spec, path)
        check_base_model(path, read_json(path / CONFIG_FILE), identity)
        bora = build_model(spec, lm, corpus.tasks)
        if (path / TASK_STORE_FOLDER).is_dir():  # the fitted task rows of a disk task store
            bora.use_task_store(TaskStore("disk", path / TASK_STORE_FOLDER, reopen=True))
        bora.load_state_dict(fit_state(path), corpus.train.collate([0]).to(bora.device))
        started = time.perf_counter()
        scores = score_fitted(spec, bora, corpus, pd.read_csv(path / "train_log.csv"))
        metrics = write_scores(path, scores, run_title(spec, bora), time.perf_counter() - started)
    remove_beside(path, "checkpoint")
    return metrics


def resume_run(run: str | Path, trust_remote_code: bool = False) -> dict:
    """Continue an interrupted run from its checkpoint, or complete a run whose scoring did not finish;
    a complete run is left as it is. Returns the metrics."""
    run = resolve(run, "run folder")
    with writer(run):  # another process writing it: exit 75, not "nothing to resume"
        recover(run)
        state = verified_status(run) if (run / CONFIG_FILE).is_file() else {}
        status = state.get("status")
        folder = checkpoint_folder(run)
        resumable = (folder / "spec.json").is_file()
        own = (
            status == COMPLETE
            and (folder / "fingerprint.json").is_file()
            and state.get("fingerprint") == fingerprint_id(read_json(folder / "fingerprint.json"))
        )
        if status == COMPLETE and (own or not resumable):  # the checkpoint, if any, is this complete run's own
            if not resumable:
                log.warning("nothing to resume: %s is already complete", run)
            remove_beside(run, "checkpoint")
            return read_metrics(run)
        if resumable:
            spec = RunSpec.from_dict(read_json(folder / "spec.json"), trust_remote_code, str(folder))
            return train_run(spec, run, resume=True)
        if status == TRAINED:
            return complete_run(run, trust_remote_code)
        if status in (INTERRUPTED, DIVERGED):
            raise FileNotFoundError(
                f"{run} is marked {status} and has no checkpoint ({folder} not found): nothing to "
                "resume; it holds its best validated state (bora-pyro evaluate works on it)"
            )
        raise FileNotFoundError(
            f"nothing to resume for {str(run)!r}: {folder / 'spec.json'} not found "
            "(train with --checkpoint-every N to make runs resumable)"
        )
