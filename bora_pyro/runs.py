"""One training run end to end, and its run folder.

A run folder holds ``config.json`` (everything needed to rebuild the run), ``metrics.json``,
``per_task.csv``, ``adapters.safetensors``, ``train_log.csv`` and ``training_curve.png``.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from . import __version__
from .artifacts import (
    ADAPTERS_FILE, RUN_FORMAT, atomic_folder, load_adapters, read_json, save_adapters, write_json,
)
from .base_models import load_base_model, resolve_device
from .data.corpus import Corpus, CorpusConfig, load_corpus
from .evaluation import PerplexityReport, evaluate
from .generation import generate
from .distributed import World
from .inference.config import TrainConfig
from .inference.svi import FitResult, fit
from .models.bora import BoRA
from .models.gates import GateConfig, relative_bops
from .models.guides import INFERENCE
from .models.prior import PARAMETERIZATIONS, parse_global_prior, parse_tau
from .models.tau_prior import TauPrior
from .peft_import import import_peft
from .plots import plot_gates, plot_training_curve
from .predictive import calibration, posterior_draws, posterior_predictive
from .diagnostics import POSTERIOR_FILE, to_inference_data

log = logging.getLogger(__name__)


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
    def from_dict(cls, d: dict) -> "RunSpec":
        corpus = dict(d["corpus"])
        if corpus.get("books") is not None:
            corpus["books"] = tuple(corpus["books"])
        adapter = {"task_subsampling": False, **d["adapter"]}  # runs written before the option used every task's prior
        return cls(d["model"], d["data"], d.get("device", "auto"), CorpusConfig(**corpus),
                   AdapterConfig(**adapter), TrainConfig(**d["train"]), d.get("posterior_samples", 8),
                   d.get("trust_remote_code", False))


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

    def generate(self, prompts: list[str], tasks: list[str], **options) -> list[str]:
        """Continue each prompt under its task's adapter ("global" = Theta); see :func:`generation.generate`."""
        return generate(self.bora.lora, self.tokenizer, self.bora.tasks, self.task_factors, self.global_factors,
                        prompts, tasks, **options)

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> PerplexityReport:
        size = batch_size or self.spec.train.eval_batch_size
        return evaluate(self.bora, self.corpus.split(split), size, factors=self.task_factors)


def _per_task_frame(corpus: Corpus, reports: dict[str, PerplexityReport], distance,
                    calibration: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({
        "task": corpus.tasks,
        "n_train_docs": corpus.train.docs_per_task(),
        "n_train_tokens": corpus.train.tokens_per_task(),
        "test_ppl": reports["test"].per_task,
        "valid_ppl": reports["valid"].per_task,
        "base_test_ppl": reports["base_test"].per_task,
        "distance_to_global": distance.cpu().numpy() if distance is not None else float("nan"),
        "test_ece": calibration.ece.to_numpy(),
        "test_brier": calibration.brier.to_numpy(),
    })
    if "posterior_predictive_test" in reports:
        frame["posterior_predictive_test_ppl"] = reports["posterior_predictive_test"].per_task
    return frame


def _train_log(result: FitResult) -> pd.DataFrame:
    losses = pd.DataFrame(result.losses)
    evals = pd.DataFrame(result.evals, columns=["step", "valid_ppl", "valid_macro_ppl", "valid_loglik_per_token"]
                         if not result.evals else None)  # learned-tau runs add tau_median.<group> columns
    return losses.merge(evals, on="step", how="left")


def checkpoint_folder(run: str | Path) -> Path:
    """Where a run keeps its checkpoints while it trains: ``<RUN>.checkpoint`` next to it."""
    run = Path(run)
    return run.parent / f"{run.name}.checkpoint"


def resume_spec(run: str | Path) -> RunSpec:
    """The settings of an interrupted run, saved beside its checkpoint."""
    folder = checkpoint_folder(run)
    if not (folder / "spec.json").is_file():
        raise FileNotFoundError(f"nothing to resume for {str(run)!r}: {folder / 'spec.json'} not found "
                                "(train with --checkpoint-every N to make runs resumable)")
    return RunSpec.from_dict(read_json(folder / "spec.json"))


def train_run(spec: RunSpec, out: str | Path, overwrite: bool = False) -> dict:
    """Train one BoRA run and write its run folder; returns the metrics written to metrics.json.

    With ``spec.train.checkpoint_every`` set, checkpoints go to :func:`checkpoint_folder` and an
    existing checkpoint there is resumed from; the folder is removed once the run folder is written.
    """
    started = time.perf_counter()
    out = _check_out(out, overwrite)
    lm, tokenizer = spec.load_model()
    corpus = load_corpus(spec.data, tokenizer, **spec.corpus.to_dict())
    bora = spec.adapter.build(lm, corpus.tasks)
    if spec.adapter.init_peft is not None:
        bora.start_from(import_peft(bora.lora, spec.adapter.init_peft))
    return _fit_and_save(spec, bora, corpus, out, overwrite, started)


def adapt_run(source: str | Path, data: str, out: str | Path, overwrite: bool = False,
              corpus_options: dict | None = None, train_options: dict | None = None) -> dict:
    """Fit adapters for NEW tasks under a fitted prior N(Theta, 1/tau), Theta held fixed.

    The base model, LoRA shape, tau and all unspecified settings come from the ``source`` run;
    ``data`` (and ``corpus_options`` / ``train_options``) describe the new tasks and their training.
    """
    started = time.perf_counter()
    out = _check_out(out, overwrite)
    source = Path(source)
    base = _read_spec(source)
    tau = base.adapter.tau
    _, _, theta, _ = load_adapters(source / ADAPTERS_FILE)
    if not isinstance(tau, float) or not 0 < tau < float("inf") or theta is None:
        raise ValueError(f"adapt needs a source run with a fixed, finite tau > 0 and a Theta; {source} has "
                         f"tau={tau} ({'no Theta' if theta is None else 'Theta present'})")
    spec = replace(base, data=data, corpus=replace(base.corpus, **(corpus_options or {})),
                   train=replace(base.train, **(train_options or {})), adapter=replace(base.adapter, inference="map"))
    lm, tokenizer = spec.load_model()
    corpus = load_corpus(spec.data, tokenizer, **spec.corpus.to_dict())
    bora = BoRA(lm, corpus.tasks, rank=spec.adapter.rank, alpha=spec.adapter.alpha, tau=tau,
                targets=spec.adapter.targets, parameterization=spec.adapter.parameterization, init=theta,
                task_subsampling=spec.adapter.task_subsampling)
    return _fit_and_save(spec, bora, corpus, out, overwrite, started, freeze_global=True,
                         extra_config={"adapted_from": str(source)})


def _check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {str(out)!r} exists and is not empty; choose another --out or pass --overwrite")
    return out


def _fit_and_save(spec: RunSpec, bora: BoRA, corpus: Corpus, out: Path, overwrite: bool, started: float,
                  freeze_global: bool = False, extra_config: dict | None = None) -> dict:
    """Fit, evaluate and write the run folder (shared by :func:`train_run` and :func:`adapt_run`)."""
    log.info("%d tasks, %d train docs; %d LoRA parameters per task", len(corpus.tasks), len(corpus.train),
             bora.lora.num_parameters())
    base_test = evaluate(bora, corpus.test, spec.train.eval_batch_size, base_model=True)
    world = World.current()
    checkpoint = checkpoint_folder(out) if spec.train.checkpoint_every else None
    if checkpoint is not None and world.is_main:
        checkpoint.mkdir(parents=True, exist_ok=True)
        write_json(checkpoint / "spec.json", spec.to_dict())
    result = fit(bora, corpus, checkpoint=checkpoint, freeze_global=freeze_global, **spec.train.to_dict())
    reports = {"valid": evaluate(bora, corpus.valid, spec.train.eval_batch_size), "base_test": base_test}
    idata = None
    if spec.posterior_samples > 0:
        draws = posterior_draws(bora, spec.posterior_samples, seed=spec.train.seed)
        reports["posterior_predictive_test"], doc_loglik = posterior_predictive(
            bora, corpus.test, draws, spec.train.eval_batch_size)
        idata = to_inference_data(bora, draws, doc_loglik, corpus.test, corpus.train.tokens_per_task(),
                                  pd.DataFrame(result.losses))
    if bora.inference == "map" and "posterior_predictive_test" in reports:
        reports["test"] = reports["posterior_predictive_test"]  # every MAP draw is the plug-in point: scored once
    else:
        reports["test"] = evaluate(bora, corpus.test, spec.train.eval_batch_size)
    factors = bora.export_factors()  # with B-LoRA gates folded in
    calib_per_task, calib = calibration(bora, corpus.test, factors, batch_size=spec.train.eval_batch_size)
    gates = None if bora.gates is None else bora.gates.report(bora.gate_values())
    metrics = {
        "test_ppl": reports["test"].token_weighted,
        "test_macro_ppl": reports["test"].task_macro,
        "valid_ppl": reports["valid"].token_weighted,
        "valid_macro_ppl": reports["valid"].task_macro,
        "base_test_ppl": base_test.token_weighted,
        "base_test_macro_ppl": base_test.task_macro,
        **({"posterior_predictive_test_ppl": reports["posterior_predictive_test"].token_weighted,
            "posterior_predictive_test_macro_ppl": reports["posterior_predictive_test"].task_macro}
           if "posterior_predictive_test" in reports else {}),
        "tau": spec.adapter.tau,
        "mode": bora.mode,
        "lr": result.lr,
        "steps": result.steps_run,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "eval_seconds_during_training": result.eval_seconds,
        "train_tokens": result.train_tokens,
        "train_tokens_per_second": result.tokens_per_second,
        "eval_tokens_per_second": reports["test"].tokens_per_second,
        "num_tasks": len(corpus.tasks),
        "lora_parameters_per_task": bora.lora.num_parameters(),
        "tau_posterior_q05_q50_q95": bora.tau_quantiles(),
        "test_ece": calib["ece"],
        "test_brier": calib["brier"],
        "posterior_samples": spec.posterior_samples,
        "device": str(bora.device),
        "processes": world.size,
        **({} if gates is None else gate_metrics(gates)),
    }
    if not world.is_main:  # data-parallel: rank 0 alone writes the run folder
        return metrics
    with atomic_folder(out, overwrite=overwrite) as tmp:
        config = {"format": RUN_FORMAT, "bora_pyro_version": __version__, "torch_version": torch.__version__,
                  "python": platform.python_version(), "tasks": list(corpus.tasks), **spec.to_dict(),
                  **(extra_config or {})}
        write_json(tmp / "config.json", config)
        _per_task_frame(corpus, reports, bora.distance_to_global(), calib_per_task).to_csv(
            tmp / "per_task.csv", index=False)
        if idata is not None:
            idata.to_netcdf(str(tmp / POSTERIOR_FILE))
        if gates is not None:
            gates.to_csv(tmp / "gates.csv", index=False)
            plot_gates(gates, tmp / "gates.png", f"{spec.model} on {spec.data}: B-LoRA gates")
        save_adapters(tmp / ADAPTERS_FILE, corpus.tasks, factors, bora.global_factors(),
                      {"rank": bora.lora.rank, "alpha": bora.lora.alpha, "targets": list(bora.lora.targets),
                       "tau": bora.tau})
        train_log = _train_log(result)
        train_log.to_csv(tmp / "train_log.csv", index=False)
        plot_training_curve(train_log, tmp / "training_curve.png", f"{spec.model} on {spec.data}, tau={bora.tau}")
        metrics["wall_seconds"] = time.perf_counter() - started
        write_json(tmp / "metrics.json", metrics)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return metrics


def gate_metrics(report: pd.DataFrame) -> dict:
    """Summary of a gate report: mean effective rank, rank by module type, bit-widths, relative BOPs."""
    return {"gates_mean_rank": float(report["rank"].mean()),
            "gates_rank_by_module": report.groupby("module")["rank"].mean().to_dict(),
            "gates_weight_bits": report["weight_bits"].value_counts().sort_index().to_dict(),
            "gates_activation_bits": report["activation_bits"].value_counts().sort_index().to_dict(),
            "relative_bops": relative_bops(report)}


def _read_spec(path: Path) -> RunSpec:
    """A run folder's settings, refusing folders of an incompatible run format."""
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    config = read_json(path / "config.json")
    if config.get("format") != RUN_FORMAT:
        raise ValueError(
            f"{path} was written by bora_pyro {config.get('bora_pyro_version', '?')} in run format "
            f"{config.get('format')!r}; this version ({__version__}) reads format {RUN_FORMAT}"
        )
    return RunSpec.from_dict(config)


def load_run(path: str | Path, device: str | None = None) -> LoadedRun:
    """Rebuild a run from its folder: same base model, same corpus split, the saved adapters."""
    path = Path(path)
    spec = _read_spec(path)
    if device is not None:
        spec = replace(spec, device=device)
    lm, tokenizer = spec.load_model()
    corpus = load_corpus(spec.data, tokenizer, **spec.corpus.to_dict())
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
    return LoadedRun(path, spec, corpus, bora, tokenizer, factors, theta)
