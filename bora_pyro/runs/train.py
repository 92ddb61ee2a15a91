"""One training run end to end: build, fit, write the fitted state, score, complete the run folder.

A run folder (see ``run_files.py``) holds ``config.json`` (everything needed to rebuild the run),
``metrics.json``, ``per_task.csv``, ``adapters.safetensors``, ``train_log.csv``, ``training_curve.png``
and ``status.json``. Checkpoints (``--checkpoint-every``) live in ``RUN.checkpoint/`` until the run is
complete; ``train --resume RUN`` continues an interrupted run, or completes one whose scoring failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..data.corpus import Corpus
from ..distributed import World
from ..evaluation.perplexity import PerplexityReport
from ..evaluation.scoring import Scores, score_run
from ..inference.checkpoint import checkpoint_step, fingerprint_differences
from ..inference.config import WATCH_ONLY, TrainConfig
from ..inference.svi import FitResult, fit
from ..io.artifacts import ADAPTERS_FILE, json_roundtrip, load_adapters, read_json, write_json
from ..io.faults import crash_point
from ..io.folders import (
    atomic_folder,
    check_target,
    folder_kind,
    folder_lock,
    recover,
    remove_ours,
    resolve,
    why_not_ours,
)
from ..io.integrity import CorruptFile
from ..io.peft_import import import_peft
from ..io.task_store import TABLE_SUFFIX, TaskStore
from ..models.bora import BoRA, check_inference
from .build import build_model, load_inputs
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
    read_status,
    run_config,
    run_entries,
    train_log,
    training_metrics,
    verified_status,
    write_fitted,
    write_scores,
)
from .spec import RunSpec

log = logging.getLogger(__name__)

CHECKPOINT_ENTRIES = ("step-*", ".tmp-*")  # a checkpoint folder's slots, written after its manifest
STORE_ENTRIES = (f"*{TABLE_SUFFIX}", "undo-*.log")  # a disk task store's tables and undo logs


class RunStopped(Exception):
    """The fit stopped before its last step (a signal, or a non-finite value); the run folder was
    written with the best validated state and the status ``status`` ("interrupted" or "diverged")."""

    def __init__(self, status: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.status, self.exit_code = status, exit_code


def store_folder(run: str | Path) -> Path:
    """Where a run's disk task store keeps its table files while it trains: ``<RUN>.store`` next to it."""
    run = Path(run)
    return run.parent / f"{run.name}.store"


def checkpoint_folder(run: str | Path) -> Path:
    """Where a run keeps its checkpoints while it trains: ``<RUN>.checkpoint`` next to it."""
    run = Path(run)
    return run.parent / f"{run.name}.checkpoint"


def tensorboard_folder(run: str | Path) -> Path:
    """Where ``--report-to tensorboard`` writes a run's event files by default: ``<RUN>.tensorboard`` next to it
    (the run folder itself appears only when the run is complete)."""
    run = Path(run)
    return run.parent / f"{run.name}.tensorboard"


def _fit_config(spec: RunSpec, out: Path) -> TrainConfig:
    """``spec``'s training settings for :func:`fit`, the event-file folder defaulted for this run."""
    if spec.train.report_to != "none" and spec.train.logging_dir is None:
        return replace(spec.train, logging_dir=str(tensorboard_folder(out)))
    return spec.train


def _writer(out: Path) -> contextlib.AbstractContextManager:
    """The run folder's lock, held by the process that writes it (rank 0 under data parallelism)."""
    return folder_lock(out) if World.current().is_main else contextlib.nullcontext()


def _run_fingerprint(spec: RunSpec, corpus: Corpus, base_model: dict) -> dict:
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
    if not remove_ours(folder, "checkpoint", CHECKPOINT_ENTRIES):
        raise FileExistsError(
            f"{folder} cannot be discarded: {why_not_ours(folder, 'checkpoint', CHECKPOINT_ENTRIES)}; move it "
            f"away to train into {str(out)!r}"
        )


def _start_checkpoints(out: Path, spec: RunSpec, fingerprint: dict, resume: bool) -> Path:
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


def train_run(
    spec: RunSpec,
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    base_test_ppl: Sequence[float] | None = None,
) -> dict:
    """Train one BoRA run and write its run folder; returns the metrics written to metrics.json.

    ``resume``: continue from the run's checkpoint folder (:func:`checkpoint_folder`), which a fresh
    run never does. ``base_test_ppl``: the base model's per-task test perplexity, known from an earlier
    run on the same split and base model (a sweep passes it), instead of scoring it again. With
    ``spec.train.checkpoint_every`` set, checkpoints go there and the folder is removed once the run is
    complete. Raises :class:`RunStopped` (after writing the folder) when the
    fit was interrupted or diverged.
    """
    started = time.perf_counter()
    check_inference(spec.prior.tau, spec.adapter.inference)  # before a model is loaded
    out = resolve(out, "run folder")
    world = World.current()
    with _writer(out):
        if world.is_main:
            recover(out)
            if not resume:
                _refuse_resumable(out, overwrite)
                check_target(out, overwrite, "run", run_entries(out))
                _refuse_earlier_checkpoint(out, overwrite)
        lm, tokenizer, identity, corpus = load_inputs(spec)
        if world.is_main and not resume:
            remove_ours(store_folder(out), "store", STORE_ENTRIES)  # table files of an earlier, unfinished run
        bora = build_model(spec, lm, corpus.tasks, store_folder=store_folder(out), reopen_store=resume)
        if spec.adapter.init_peft is not None:
            bora.start_from(import_peft(bora.lora, spec.adapter.init_peft))
        fingerprint = _run_fingerprint(spec, corpus, identity)
        checkpoint = None
        if spec.train.checkpoint_every or resume:
            checkpoint = _start_checkpoints(out, spec, fingerprint, resume) if world.is_main else checkpoint_folder(out)
        result = fit(
            bora, corpus, checkpoint=checkpoint, resume=resume, fingerprint=fingerprint, config=_fit_config(spec, out)
        )
        return _finish(
            spec,
            bora,
            corpus,
            result,
            out,
            run_config(spec.to_dict(), corpus, identity),
            started,
            overwrite or resume,
            fingerprint_id(fingerprint),
            None if base_test_ppl is None else PerplexityReport.from_per_task_perplexity(corpus.test, base_test_ppl),
            tokenizer=tokenizer,
        )


def adapt_run(
    source: str | Path,
    data: str,
    out: str | Path,
    overwrite: bool = False,
    corpus_options: dict | None = None,
    train_options: dict | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Fit adapters for NEW tasks under a fitted prior N(Theta, 1/tau), Theta held fixed.

    The base model, LoRA shape, tau and all unspecified settings come from the ``source`` run;
    ``data`` (and ``corpus_options`` / ``train_options``) describe the new tasks and their training.
    """
    started = time.perf_counter()
    out, source = resolve(out, "run folder"), resolve(source, "run folder")
    check_target(out, overwrite, "run", run_entries(out), sources=(source,))
    verified_status(source)
    base = RunSpec.from_run_folder(source, trust_remote_code)
    tau = base.prior.tau
    _, _, theta, _ = load_adapters(source / ADAPTERS_FILE)
    if not isinstance(tau, float) or not 0 < tau < float("inf") or theta is None:
        raise ValueError(
            f"adapt needs a source run with a fixed, finite tau > 0 and a Theta; {source} has "
            f"tau={tau} ({'no Theta' if theta is None else 'Theta present'})"
        )
    spec = replace(
        base,
        data=data,
        corpus=replace(base.corpus, **(corpus_options or {})),
        train=replace(base.train, **(train_options or {})),
        adapter=replace(base.adapter, inference="map"),
    )
    with _writer(out):
        check_target(out, overwrite, "run", run_entries(out), sources=(source,))
        lm, tokenizer, identity, corpus = load_inputs(spec)
        check_base_model(source, read_json(source / CONFIG_FILE), identity)
        bora = build_model(spec, lm, corpus.tasks, init=theta)
        result = fit(bora, corpus, freeze_global=True, config=_fit_config(spec, out))
        config = run_config(spec.to_dict(), corpus, identity, {"adapted_from": str(source)})
        return _finish(
            spec, bora, corpus, result, out, config, started, overwrite, sources=(source,), tokenizer=tokenizer
        )


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


def _finish(
    spec: RunSpec,
    bora: BoRA,
    corpus: Corpus,
    result: FitResult,
    out: Path,
    config: dict,
    started: float,
    overwrite: bool,
    fingerprint: str | None = None,
    base_test: PerplexityReport | None = None,
    sources: tuple[Path, ...] = (),
    tokenizer=None,
) -> dict:
    """Write the fitted state (stage 1), then score and complete the folder (stage 2; every rank scores,
    rank 0 writes). Raises :class:`RunStopped` for a fit that stopped early, after stage 1."""
    world = World.current()
    status = TRAINED if result.status == "trained" else result.status
    metrics = {
        **training_metrics(result, bora, corpus, spec.prior.tau, world.size),
        "wall_seconds": time.perf_counter() - started,
    }
    if world.is_main:
        write_fitted(out, config, bora, corpus, result, metrics, status, overwrite, fingerprint, sources, tokenizer)
        if bora.task_store.disk:  # its files are now linked into the run folder
            bora.task_store.close()
            bora.task_store.folder = out / TASK_STORE_FOLDER
            remove_ours(store_folder(out), "store", STORE_ENTRIES)
    crash_point("run.fitted")
    if status != TRAINED:
        raise _stopped(out, result)
    scored = time.perf_counter()
    scores = _score(spec, bora, corpus, train_log(result), valid=result.best_valid, base_test=base_test)
    if not world.is_main:  # data-parallel: rank 0 alone writes the run folder
        return {**metrics, **scores.metrics}
    metrics = write_scores(out, scores, _title(spec, bora), time.perf_counter() - scored)
    _remove_checkpoints(out)
    return metrics


def _score(spec: RunSpec, bora: BoRA, corpus: Corpus, log: pd.DataFrame, **known) -> Scores:
    """Stage 2's computations, with the run's evaluation settings (``known``: reports already scored)."""
    return score_run(
        bora,
        corpus,
        spec.train.eval_batch_size,
        spec.posterior_samples,
        spec.train.seed,
        log,
        curvature_docs=spec.curvature_docs,
        **known,
    )


def _stopped(out: Path, result: FitResult) -> RunStopped:
    where = f"{out} holds the best validated state (step {result.state.best_step}), marked {result.status}"
    step = checkpoint_step(checkpoint_folder(out))
    if result.status == INTERRUPTED:
        more = (
            f"; continue with 'bora-pyro train --resume {out}' (checkpoint at step {step})"
            if step is not None
            else "; it had no checkpoints (--checkpoint-every N makes a run resumable)"
        )
        return RunStopped(INTERRUPTED, f"{result.message}; {where}{more}", 128 + (result.signal or 15))
    return RunStopped(DIVERGED, f"{result.message}; {where}", 1)


def _remove_checkpoints(out: Path) -> None:
    remove_ours(checkpoint_folder(out), "checkpoint", CHECKPOINT_ENTRIES)


def _title(spec: RunSpec, bora: BoRA) -> str:
    return f"{spec.model} on {spec.data}, tau={bora.tau}"


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
        scores = _score(spec, bora, corpus, pd.read_csv(path / "train_log.csv"))
        metrics = write_scores(path, scores, _title(spec, bora), time.perf_counter() - started)
    _remove_checkpoints(path)
    return metrics


def resume_run(run: str | Path, trust_remote_code: bool = False) -> dict:
    """Continue an interrupted run from its checkpoint, or complete a run whose scoring did not finish;
    a complete run is left as it is. Returns the metrics."""
    run = resolve(run, "run folder")
    with _writer(run):  # another process writing it: exit 75, not "nothing to resume"
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
            _remove_checkpoints(run)
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
