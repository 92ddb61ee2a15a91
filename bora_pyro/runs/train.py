"""One training run end to end: build, fit, write the fitted state, score, complete the run folder.

A run folder (see ``run_files.py``) holds ``config.json`` (everything needed to rebuild the run),
``metrics.json``, ``per_task.csv``, ``adapters.safetensors``, ``train_log.csv``, ``training_curve.png``
and ``status.json``. Checkpoints (``--checkpoint-every``) live in ``RUN.checkpoint/`` until the run is
complete (``checkpoints.py``); ``train --resume RUN`` continues an interrupted run, or completes one whose scoring
failed (``resume.py``).
"""

from __future__ import annotations

import contextlib
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
from ..inference.checkpoint import checkpoint_step
from ..inference.config import TrainConfig
from ..inference.svi import FitResult, fit
from ..io.artifacts import ADAPTERS_FILE, load_adapters, read_json
from ..io.faults import crash_point
from ..io.folders import (
    folder_lock,
    recover,
    resolve,
)
from ..io.peft_import import import_peft
from ..models.bora import BoRA, check_inference
from .build import build_model, load_inputs
from .checkpoints import (
    RunTarget,
    beside,
    checkpoint_folder,
    claim_run_folder,
    fingerprint_id,
    remove_beside,
    run_fingerprint,
    start_checkpoints,
)
from .run_files import (
    CONFIG_FILE,
    DIVERGED,
    INTERRUPTED,
    TASK_STORE_FOLDER,
    TRAINED,
    check_base_model,
    run_config,
    train_log,
    training_metrics,
    verified_status,
    write_fitted,
    write_scores,
)
from .spec import RunSpec

log = logging.getLogger(__name__)


class RunStopped(Exception):
    """The fit stopped before its last step (a signal, or a non-finite value); the run folder was
    written with the best validated state and the status ``status`` ("interrupted" or "diverged")."""

    def __init__(self, status: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.status, self.exit_code = status, exit_code


def _fit_config(spec: RunSpec, out: Path) -> TrainConfig:
    """``spec``'s training settings for :func:`fit`, the event-file folder defaulted for this run."""
    if spec.train.report_to != "none" and spec.train.logging_dir is None:
        return replace(spec.train, logging_dir=str(beside(out, "tensorboard")))
    return spec.train


def writer(out: Path) -> contextlib.AbstractContextManager:
    """The run folder's lock, held by the process that writes it (rank 0 under data parallelism)."""
    return folder_lock(out) if World.current().is_main else contextlib.nullcontext()


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
    with writer(out):
        if world.is_main:
            recover(out)
            target = claim_run_folder(out, overwrite, resume)
        else:  # only rank 0 writes
            target = RunTarget(out, overwrite or resume)
        lm, tokenizer, identity, corpus = load_inputs(spec)
        if world.is_main and not resume:
            remove_beside(out, "store")  # table files of an earlier, unfinished run
        bora = build_model(spec, lm, corpus.tasks, store_folder=beside(out, "store"), reopen_store=resume)
        if spec.adapter.init_peft is not None:
            bora.start_from(import_peft(bora.lora, spec.adapter.init_peft))
        fingerprint = run_fingerprint(spec, corpus, identity)
        checkpoint = None
        if spec.train.checkpoint_every or resume:
            checkpoint = start_checkpoints(out, spec, fingerprint, resume) if world.is_main else checkpoint_folder(out)
        result = fit(
            bora, corpus, checkpoint=checkpoint, resume=resume, fingerprint=fingerprint, config=_fit_config(spec, out)
        )
        return _finish(
            spec,
            bora,
            corpus,
            result,
            target,
            run_config(spec.to_dict(), corpus, identity),
            started,
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
    with writer(out):
        target = claim_run_folder(out, overwrite, sources=(source,))
        return _adapt(source, data, target, started, corpus_options, train_options, trust_remote_code)


def _adapt(
    source: Path,
    data: str,
    target: RunTarget,
    started: float,
    corpus_options: dict | None,
    train_options: dict | None,
    trust_remote_code: bool,
) -> dict:
    """:func:`adapt_run` once its target is claimed (the folder's lock held)."""
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
    lm, tokenizer, identity, corpus = load_inputs(spec)
    check_base_model(source, read_json(source / CONFIG_FILE), identity)
    bora = build_model(spec, lm, corpus.tasks, init=theta)
    result = fit(bora, corpus, freeze_global=True, config=_fit_config(spec, target.out))
    config = run_config(spec.to_dict(), corpus, identity, {"adapted_from": str(source)})
    return _finish(spec, bora, corpus, result, target, config, started, tokenizer=tokenizer)


def _finish(
    spec: RunSpec,
    bora: BoRA,
    corpus: Corpus,
    result: FitResult,
    target: RunTarget,
    config: dict,
    started: float,
    fingerprint: str | None = None,
    base_test: PerplexityReport | None = None,
    tokenizer=None,
) -> dict:
    """Write the fitted state (stage 1) at the claimed ``target``, then score and complete the folder (stage 2;
    every rank scores, rank 0 writes). Raises :class:`RunStopped` for a fit that stopped early, after stage 1."""
    out = target.out
    world = World.current()
    status = TRAINED if result.status == "trained" else result.status
    metrics = {
        **training_metrics(result, bora, corpus, spec.prior.tau, world.size),
        "wall_seconds": time.perf_counter() - started,
    }
    if world.is_main:
        write_fitted(
            out, config, bora, corpus, result, metrics, status, target.replace, fingerprint, target.sources, tokenizer
        )
        if bora.task_store.disk:  # its files are now linked into the run folder
            bora.task_store.close()
            bora.task_store.folder = out / TASK_STORE_FOLDER
            remove_beside(out, "store")
    crash_point("run.fitted")
    if status != TRAINED:
        raise _stopped(out, result)
    scored = time.perf_counter()
    scores = score_fitted(spec, bora, corpus, train_log(result), valid=result.best_valid, base_test=base_test)
    if not world.is_main:  # data-parallel: rank 0 alone writes the run folder
        return {**metrics, **scores.metrics}
    metrics = write_scores(out, scores, run_title(spec, bora), time.perf_counter() - scored)
    remove_beside(out, "checkpoint")
    return metrics


def score_fitted(spec: RunSpec, bora: BoRA, corpus: Corpus, log: pd.DataFrame, **known) -> Scores:
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


def run_title(spec: RunSpec, bora: BoRA) -> str:
    return f"{spec.model} on {spec.data}, tau={bora.tau}"
