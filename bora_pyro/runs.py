"""One training run end to end: build, fit, write the fitted state, score, complete the run folder.

A run folder (see ``run_folder.py``) holds ``config.json`` (everything needed to rebuild the run),
``metrics.json``, ``per_task.csv``, ``adapters.safetensors``, ``train_log.csv``, ``training_curve.png``
and ``status.json``. Checkpoints (``--checkpoint-every``) live in ``RUN.checkpoint/`` until the run is
complete; ``train --resume RUN`` continues an interrupted run, or completes one whose scoring failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from . import __version__
from .artifacts import ADAPTERS_FILE, RUN_FORMAT, json_roundtrip, load_adapters, read_json, write_json
from .base_models import describe_base_model, load_base_model, resolve_device
from .data.corpus import Corpus, CorpusConfig, load_corpus
from .distributed import World
from .evaluation import PerplexityReport, evaluate
from .faults import crash_point
from .folders import atomic_folder, check_target, folder_lock, is_ours, recover
from .generation import generate
from .inference.checkpoint import checkpoint_step, fingerprint_differences
from .inference.config import TrainConfig
from .inference.svi import FitResult, fit
from .models.bora import BoRA
from .models.gates import GateConfig
from .models.guides import INFERENCE
from .models.prior import PARAMETERIZATIONS, parse_global_prior, parse_tau
from .models.tau_prior import TauPrior
from .peft_import import import_peft
from .run_folder import (
    COMPLETE, CONFIG_FILE, DIVERGED, INTERRUPTED, TRAINED, fit_state, read_status, run_config, training_metrics,
    train_log, write_fitted, write_scores,
)
from .scoring import score_run

log = logging.getLogger(__name__)


class RemoteCodeRefused(ValueError):
    """A saved run or sweep asks for trust_remote_code, which only the user can grant."""


class RunStopped(Exception):
    """The fit stopped before its last step (a signal, or a non-finite value); the run folder was
    written with the best validated state and the status ``status`` ("interrupted" or "diverged")."""

    def __init__(self, status: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.status, self.exit_code = status, exit_code


@dataclass(frozen=True)
class AdapterConfig:
    """The BoRA model's settings: LoRA shape, prior precision, parameterisation, inference."""

    rank: int = 8
    alpha: float = 16.0
    tau: float | str = 100.0  # or "learn" (with inference="vi")
    targets: tuple[str, ...] | None = None
    parameterization: str = "noncentered"
    inference: str = "map"
    init_seed: int = 0
    tau_prior: str = "lognormal:4.6,2"  # hyperprior of a learned tau (see models/tau_prior.py)
    tau_groups: str = "global"  # learned tau: "global" or one per "module" type
    global_prior: str = "flat"  # Theta a parameter, or "normal:SCALE": Theta latent (see models/prior.py)
    init_peft: str | None = None  # a PEFT LoRA adapter folder: the start of Theta and every task
    task_subsampling: bool = True  # a step touches only its batch's tasks (see models/task_subsample.py)
    rank_gates: str | None = None  # B-LoRA rank gates: "shared" or "per-task" (see models/gates.py)
    quant_gates: str | None = None  # B-LoRA precision gates: "weights" or "weights+activations"
    rank_lambda: float = 1.0  # penalty per expected open rank gate (B-LoRA's default)
    quant_lambda: float = 1.0  # penalty per expected open precision gate
    gate_init: float = 3.0  # the gates' starting log-alpha (3: open with probability 0.99)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        object.__setattr__(self, "tau", parse_tau(self.tau))
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {self.inference!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        self.hyperprior()  # validates the spec
        parse_global_prior(self.global_prior)
        self.gate_config()

    def gate_config(self) -> GateConfig:
        return GateConfig(rank=self.rank_gates, quant=self.quant_gates, rank_lambda=self.rank_lambda,
                          quant_lambda=self.quant_lambda, init_log_alpha=self.gate_init)

    def hyperprior(self) -> TauPrior:
        return TauPrior.parse(self.tau_prior, self.tau_groups)

    def build(self, lm, tasks) -> BoRA:
        return BoRA(
            lm, tasks, rank=self.rank, alpha=self.alpha, tau=self.tau, targets=self.targets,
            parameterization=self.parameterization, inference=self.inference, seed=self.init_seed,
            tau_prior=self.hyperprior(), global_scale=parse_global_prior(self.global_prior),
            task_subsampling=self.task_subsampling, gates=self.gate_config(),
        )


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run: base model, corpus, adapter model, training."""

    model: str = "smollm2-135m"
    data: str = "bible-books"
    device: str = "auto"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    posterior_samples: int = 8  # guide draws for posterior-predictive perplexity and ArviZ (0 = skip)
    trust_remote_code: bool = False  # let a hub model run its own Python code (only for models you trust)

    def __post_init__(self) -> None:
        if self.posterior_samples < 0:
            raise ValueError(f"posterior_samples must be >= 0, got {self.posterior_samples}")

    def load_model(self):
        """The base LM and tokenizer of this run, on its device."""
        return load_base_model(self.model, device=resolve_device(self.device), trust_remote_code=self.trust_remote_code)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "device": self.device, "corpus": self.corpus.to_dict(),
                "adapter": asdict(self.adapter), "train": self.train.to_dict(),
                "posterior_samples": self.posterior_samples, "trust_remote_code": self.trust_remote_code}

    @classmethod
    def from_dict(cls, d: dict, trust_remote_code: bool = False, source: str = "this run") -> "RunSpec":
        """The spec saved in a file. A file never grants ``trust_remote_code``: a spec that asks for it is
        refused unless the caller (the user, e.g. with ``--trust-remote-code``) grants it too."""
        if d.get("trust_remote_code") and not trust_remote_code:
            raise RemoteCodeRefused(
                f"{source} was made with --trust-remote-code (model {d.get('model')!r} runs Python code from its "
                "repository); bora_pyro never takes that permission from a file: pass --trust-remote-code "
                "yourself if you trust that model's code"
            )
        corpus = dict(d["corpus"])
        if corpus.get("books") is not None:
            corpus["books"] = tuple(corpus["books"])
        adapter = {"task_subsampling": False, **d["adapter"]}  # runs written before the option used every task's prior
        return cls(d["model"], d["data"], d.get("device", "auto"), CorpusConfig(**corpus),
                   AdapterConfig(**adapter), TrainConfig(**d["train"]), d.get("posterior_samples", 8),
                   bool(d.get("trust_remote_code", False)))


@dataclass
class LoadedRun:
    """A run folder brought back to life: the spec, corpus, model, and the saved task factors."""

    path: Path
    spec: RunSpec
    corpus: Corpus
    bora: BoRA
    tokenizer: object
    task_factors: dict[str, torch.Tensor]  # name -> [D, ...]
    global_factors: dict[str, torch.Tensor] | None  # Theta (None for independent runs)
    status: str = COMPLETE
    base_model: dict | None = None  # the identity recorded at training (name, hub id, weights hash)

    def generate(self, prompts: list[str], tasks: list[str], **options) -> list[str]:
        """Continue each prompt under its task's adapter ("global" = Theta); see :func:`generation.generate`."""
        return generate(self.bora.lora, self.tokenizer, self.bora.tasks, self.task_factors, self.global_factors,
                        prompts, tasks, **options)

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> PerplexityReport:
        size = batch_size or self.spec.train.eval_batch_size
        return evaluate(self.bora, self.corpus.split(split), size, factors=self.task_factors)


def checkpoint_folder(run: str | Path) -> Path:
    """Where a run keeps its checkpoints while it trains: ``<RUN>.checkpoint`` next to it."""
    run = Path(run)
    return run.parent / f"{run.name}.checkpoint"


def _writer(out: Path) -> contextlib.AbstractContextManager:
    """The run folder's lock, held by the process that writes it (rank 0 under data parallelism)."""
    return folder_lock(out) if World.current().is_main else contextlib.nullcontext()


def _fingerprint(spec: RunSpec, corpus: Corpus, base_model: dict) -> dict:
    """What a checkpoint must match to be resumed: every setting that changes the result, the tokenised
    corpus and the base model's weights."""
    settings = spec.to_dict()
    for key in ("device", "trust_remote_code"):
        settings.pop(key)
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in ("progress", "checkpoint_every")}
    return json_roundtrip({"settings": settings, "corpus_sha256": corpus.content_sha256(),
                           "base_weights_sha256": base_model["weights_sha256"]})


def fingerprint_id(fingerprint: dict) -> str:
    """A short digest of a fingerprint, recorded in status.json to tell a run's own checkpoint from another's."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _refuse_earlier_checkpoint(out: Path, overwrite: bool) -> None:
    """A fresh run never continues an earlier run's checkpoint: refuse, or with ``overwrite`` discard it."""
    folder = checkpoint_folder(out)
    if not folder.exists():
        return
    step = checkpoint_step(folder)
    if not overwrite:
        held = f"a checkpoint at step {step}" if step is not None else "the settings"
        raise FileExistsError(f"{folder} holds {held} of an earlier run of {str(out)!r}: continue it with "
                              f"'bora-pyro train --resume {out}', or pass --overwrite to discard it")
    if not is_ours(folder):
        raise FileExistsError(f"{folder} was not written by bora_pyro; move it away to train into {str(out)!r}")
    shutil.rmtree(folder)


def _start_checkpoints(out: Path, spec: RunSpec, fingerprint: dict, resume: bool) -> Path:
    """The checkpoint folder of a run: created (with the spec, atomically) for a fresh run; for a resumed
    one, checked against what it was started with (a difference is named)."""
    folder = checkpoint_folder(out)
    if resume:
        differing = fingerprint_differences(read_json(folder / "fingerprint.json"), fingerprint)
        if differing:
            raise ValueError(f"cannot resume {str(out)!r}: {', '.join(differing[:8])} changed since it was started "
                             "(the data, the base model or a setting); train it again instead")
        return folder
    with atomic_folder(folder, "checkpoint") as tmp:
        write_json(tmp / "spec.json", spec.to_dict())
        write_json(tmp / "fingerprint.json", fingerprint)
    return folder


def _load(spec: RunSpec) -> tuple[object, object, dict, Corpus]:
    """The run's base LM, tokenizer and identity (before wrapping), and its corpus."""
    lm, tokenizer = spec.load_model()
    identity = describe_base_model(spec.model, lm)
    corpus = load_corpus(spec.data, tokenizer, **spec.corpus.to_dict())
    return lm, tokenizer, identity, corpus


def train_run(spec: RunSpec, out: str | Path, overwrite: bool = False, resume: bool = False) -> dict:
    """Train one BoRA run and write its run folder; returns the metrics written to metrics.json.

    ``resume``: continue from the run's checkpoint folder (:func:`checkpoint_folder`), which a fresh
    run never does. With ``spec.train.checkpoint_every`` set, checkpoints go there and the folder is
    removed once the run is complete. Raises :class:`RunStopped` (after writing the folder) when the
    fit was interrupted or diverged.
    """
    started = time.perf_counter()
    out = Path(out)
    world = World.current()
    with _writer(out):
        if world.is_main:
            recover(out)
            if not resume:
                _refuse_resumable(out, overwrite)
                check_target(out, overwrite, "run folder")
                _refuse_earlier_checkpoint(out, overwrite)
        lm, _, identity, corpus = _load(spec)
        bora = spec.adapter.build(lm, corpus.tasks)
        if spec.adapter.init_peft is not None:
            bora.start_from(import_peft(bora.lora, spec.adapter.init_peft))
        fingerprint = _fingerprint(spec, corpus, identity)
        checkpoint = None
        if spec.train.checkpoint_every or resume:
            checkpoint = _start_checkpoints(out, spec, fingerprint, resume) if world.is_main else checkpoint_folder(out)
        result = fit(bora, corpus, checkpoint=checkpoint, resume=resume, fingerprint=fingerprint, **spec.train.to_dict())
        return _finish(spec, bora, corpus, result, out, run_config(spec.to_dict(), corpus, identity), started,
                       overwrite or resume, fingerprint_id(fingerprint))


def adapt_run(source: str | Path, data: str, out: str | Path, overwrite: bool = False,
              corpus_options: dict | None = None, train_options: dict | None = None,
              trust_remote_code: bool = False) -> dict:
    """Fit adapters for NEW tasks under a fitted prior N(Theta, 1/tau), Theta held fixed.

    The base model, LoRA shape, tau and all unspecified settings come from the ``source`` run;
    ``data`` (and ``corpus_options`` / ``train_options``) describe the new tasks and their training.
    """
    started = time.perf_counter()
    out, source = Path(out), Path(source)
    base = _read_spec(source, trust_remote_code)
    tau = base.adapter.tau
    _, _, theta, _ = load_adapters(source / ADAPTERS_FILE)
    if not isinstance(tau, float) or not 0 < tau < float("inf") or theta is None:
        raise ValueError(f"adapt needs a source run with a fixed, finite tau > 0 and a Theta; {source} has "
                         f"tau={tau} ({'no Theta' if theta is None else 'Theta present'})")
    spec = replace(base, data=data, corpus=replace(base.corpus, **(corpus_options or {})),
                   train=replace(base.train, **(train_options or {})), adapter=replace(base.adapter, inference="map"))
    with _writer(out):
        check_target(out, overwrite, "run folder")
        lm, _, identity, corpus = _load(spec)
        _check_base_model(source, read_json(source / CONFIG_FILE), identity)
        bora = BoRA(lm, corpus.tasks, rank=spec.adapter.rank, alpha=spec.adapter.alpha, tau=tau,
                    targets=spec.adapter.targets, parameterization=spec.adapter.parameterization, init=theta,
                    task_subsampling=spec.adapter.task_subsampling)
        result = fit(bora, corpus, freeze_global=True, **spec.train.to_dict())
        config = run_config(spec.to_dict(), corpus, identity, {"adapted_from": str(source)})
        return _finish(spec, bora, corpus, result, out, config, started, overwrite)


def _refuse_resumable(out: Path, overwrite: bool) -> None:
    """A folder holding an interrupted run is continued with --resume, not silently restarted."""
    if overwrite or not out.is_dir() or not is_ours(out):
        return
    with contextlib.suppress(FileNotFoundError, ValueError):
        status = read_status(out)["status"]
        if status in (INTERRUPTED, TRAINED):
            raise FileExistsError(f"{str(out)!r} holds a run marked {status}: continue it with "
                                  f"'bora-pyro train --resume {out}', or pass --overwrite to train it again")


def _finish(spec: RunSpec, bora: BoRA, corpus: Corpus, result: FitResult, out: Path, config: dict,
            started: float, overwrite: bool, fingerprint: str | None = None) -> dict:
    """Write the fitted state (stage 1), then score and complete the folder (stage 2; every rank scores,
    rank 0 writes). Raises :class:`RunStopped` for a fit that stopped early, after stage 1."""
    world = World.current()
    status = TRAINED if result.status == "trained" else result.status
    metrics = {**training_metrics(result, bora, corpus, spec.adapter.tau, world.size),
               "wall_seconds": time.perf_counter() - started}
    if world.is_main:
        write_fitted(out, config, bora, corpus, result, metrics, status, overwrite, fingerprint)
    crash_point("run.fitted")
    if status != TRAINED:
        raise _stopped(out, result)
    scored = time.perf_counter()
    scores = score_run(bora, corpus, spec.train.eval_batch_size, spec.posterior_samples, spec.train.seed,
                       train_log(result))
    if not world.is_main:  # data-parallel: rank 0 alone writes the run folder
        return {**metrics, **scores.metrics}
    metrics = write_scores(out, scores, _title(spec, bora), time.perf_counter() - scored)
    _remove_checkpoints(out)
    return metrics


def _stopped(out: Path, result: FitResult) -> RunStopped:
    where = f"{out} holds the best validated state (step {result.best_step}), marked {result.status}"
    step = checkpoint_step(checkpoint_folder(out))
    if result.status == INTERRUPTED:
        more = (f"; continue with 'bora-pyro train --resume {out}' (checkpoint at step {step})" if step is not None
                else "; it had no checkpoints (--checkpoint-every N makes a run resumable)")
        return RunStopped(INTERRUPTED, f"{result.message}; {where}{more}", 128 + (result.signal or 15))
    return RunStopped(DIVERGED, f"{result.message}; {where}", 1)


def _remove_checkpoints(out: Path) -> None:
    folder = checkpoint_folder(out)
    if folder.is_dir() and is_ours(folder):
        shutil.rmtree(folder)


def _title(spec: RunSpec, bora: BoRA) -> str:
    return f"{spec.model} on {spec.data}, tau={bora.tau}"


def complete_run(path: str | Path, trust_remote_code: bool = False, device: str | None = None) -> dict:
    """Score a run folder marked ``trained`` (its scoring failed or was interrupted) and mark it complete;
    returns its metrics (a complete run's as they are)."""
    path = Path(path)
    with folder_lock(path):
        recover(path)
        status = read_status(path)["status"]
        if status == COMPLETE:
            return read_json(path / "metrics.json")
        if status != TRAINED:
            raise ValueError(f"{path} is marked {status}: only a run marked trained can be completed")
        spec = _read_spec(path, trust_remote_code)
        spec = spec if device is None else replace(spec, device=device)
        lm, _, identity, corpus = _load(spec)
        _check_base_model(path, read_json(path / CONFIG_FILE), identity)
        bora = spec.adapter.build(lm, corpus.tasks)
        bora.load_state_dict(fit_state(path), corpus.train.collate([0]).to(bora.device))
        started = time.perf_counter()
        scores = score_run(bora, corpus, spec.train.eval_batch_size, spec.posterior_samples, spec.train.seed,
                           pd.read_csv(path / "train_log.csv"))
        metrics = write_scores(path, scores, _title(spec, bora), time.perf_counter() - started)
    _remove_checkpoints(path)
    return metrics


def resume_run(run: str | Path, trust_remote_code: bool = False) -> dict:
    """Continue an interrupted run from its checkpoint, or complete a run whose scoring did not finish;
    a complete run is left as it is. Returns the metrics."""
    run = Path(run)
    recover(run)
    state = read_status(run) if (run / CONFIG_FILE).is_file() else {}
    status = state.get("status")
    folder = checkpoint_folder(run)
    resumable = (folder / "spec.json").is_file()
    own = (status == COMPLETE and (folder / "fingerprint.json").is_file()
           and state.get("fingerprint") == fingerprint_id(read_json(folder / "fingerprint.json")))
    if status == COMPLETE and (own or not resumable):  # the checkpoint, if any, is this complete run's own
        if not resumable:
            log.warning("nothing to resume: %s is already complete", run)
        _remove_checkpoints(run)
        return read_json(run / "metrics.json")
    if resumable:
        spec = RunSpec.from_dict(read_json(folder / "spec.json"), trust_remote_code, str(folder))
        return train_run(spec, run, resume=True)
    if status == TRAINED:
        return complete_run(run, trust_remote_code)
    if status in (INTERRUPTED, DIVERGED):
        raise FileNotFoundError(f"{run} is marked {status} and has no checkpoint ({folder} not found): nothing to "
                                "resume; it holds its best validated state (bora-pyro evaluate works on it)")
    raise FileNotFoundError(f"nothing to resume for {str(run)!r}: {folder / 'spec.json'} not found "
                            "(train with --checkpoint-every N to make runs resumable)")


def _check_base_model(path: Path, config: dict, loaded: dict) -> None:
    """Refuse a base model whose weights differ from those the run's adapters were trained against."""
    recorded = (config.get("base_model") or {}).get("weights_sha256")
    if recorded is None:
        log.warning("%s records no base-model hash (written before bora_pyro recorded one): not checked", path)
        return
    if recorded != loaded["weights_sha256"]:
        raise ValueError(
            f"{path} was trained against other weights of {config.get('model')!r} than those loaded now "
            f"(sha256 {recorded[:12]}... recorded, {loaded['weights_sha256'][:12]}... loaded): the base model "
            "changed since (another revision, conversion or file); load the exact weights it was trained on"
        )


def _read_spec(path: Path, trust_remote_code: bool = False) -> RunSpec:
    """A run folder's settings, refusing folders of an incompatible run format."""
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    config = read_json(path / CONFIG_FILE)
    if config.get("format") != RUN_FORMAT:
        raise ValueError(
            f"{path} was written by bora_pyro {config.get('bora_pyro_version', '?')} in run format "
            f"{config.get('format')!r}; this version ({__version__}) reads format {RUN_FORMAT}"
        )
    return RunSpec.from_dict(config, trust_remote_code, str(path))


def load_run(path: str | Path, device: str | None = None, trust_remote_code: bool = False) -> LoadedRun:
    """Rebuild a run from its folder: same base model (the weights it was trained on: checked), same
    corpus split, the saved adapters. ``trust_remote_code``: your permission for a model that needs it
    (never taken from the folder)."""
    path = Path(path)
    recover(path)
    spec = _read_spec(path, trust_remote_code)
    if device is not None:
        spec = replace(spec, device=device)
    status = read_status(path)["status"]
    lm, tokenizer, identity, corpus = _load(spec)
    config = read_json(path / CONFIG_FILE)
    _check_base_model(path, config, identity)
    tasks, factors, theta, _ = load_adapters(path / ADAPTERS_FILE)
    if tuple(tasks) != corpus.tasks:
        raise ValueError(f"{path}: adapter tasks {tasks} do not match the rebuilt corpus tasks {list(corpus.tasks)}")
    bora = replace(spec.adapter, rank_gates=None, quant_gates=None).build(lm, corpus.tasks)  # gates are folded in the saved adapters
    expected = bora.lora.shapes()
    for name, shape in expected.items():
        if name not in factors or tuple(factors[name].shape[1:]) != shape:
            raise ValueError(f"{path}: adapter tensor {name!r} is missing or has the wrong shape (expected [D, *{shape}])")
    factors = {k: v.to(bora.device) for k, v in factors.items()}
    theta = None if theta is None else {k: v.to(bora.device) for k, v in theta.items()}
    return LoadedRun(path, spec, corpus, bora, tokenizer, factors, theta, status, config.get("base_model"))
