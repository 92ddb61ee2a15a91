"""Training configuration (validated on construction)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..data.sampling import check_task_sampling, parse_task_sampling
from ..options import option, parse_optional_int
from .reporting import REPORT_TO, check_reporter_installed

LR_SCHEDULES = ("constant", "linear", "cosine")
# The options that change how a fit is watched or saved, not what it computes (a checkpoint resumes across them).
WATCH_ONLY = ("progress", "checkpoint_every", "report_to", "logging_dir")


def parse_clip_norm(text: str) -> float | None:
    """ "0" or "none" -> None (no clipping), else the norm."""
    return None if text.strip().lower() in ("0", "none") or float(text) == 0 else float(text)


@dataclass(frozen=True)
class TrainConfig:
    """How the SVI loop runs (every field is a CLI option).

    ``lr_tau_scaling`` is the paper's rule of a learning rate proportional to tau, anchored so that
    ``tau == lr_tau_reference`` gets ``lr`` (only finite tau > 0; tau = 0 and inf keep ``lr``).
    ``patience`` stops after that many validations without a better validation log-likelihood
    (None: run all steps). The best validated state is restored at the end either way.
    """

    steps: int = option(100, "optimisation steps")
    batch_size: int = option(8, "documents per step (the global batch under data parallelism)")
    grad_accum: int = option(
        1,
        "micro-batches per step: each step's batch is cut into N parts, run forward and backward in turn, then "
        "one optimizer step (the same update as the whole batch, the activation memory of one part)",
    )
    task_sampling: str = option(
        "proportional",
        "how a step draws its documents: proportional (each document alike, in epochs), uniform (each task "
        "alike), temperature:T (task probability proportional to size^(1/T), T >= 1 typical; "
        "temperature:inf = uniform); "
        "the likelihood is reweighted so the posterior stays the same, only the gradient noise changes",
        parse=check_task_sampling,
        metavar="MODE",
    )
    lr: float = option(1e-3, "AdamW learning rate of the LoRA weights and Theta")
    guide_lr: float = option(
        1e-2,
        "learning rate of the guide's scales and a learned tau (--inference vi) and of the "
        "B-LoRA gates' log-alphas (at --lr they would barely move from their start)",
    )
    lr_schedule: str = option(
        "constant",
        "after the warmup: constant, linear or cosine (both decay to 0 at the last step)",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = option(0, "steps over which the learning rate rises linearly to its value (HF convention)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_norm: float | None = option(1.0, "global gradient-norm clip (0 = off)", parse=parse_clip_norm)
    lr_tau_scaling: bool = option(False, "the paper's rule: learning rate proportional to tau")
    lr_tau_reference: float = option(100.0, "with --lr-tau-scaling, the tau that gets --lr")
    eval_every: int = option(25, "validate every N steps (and at the last step)")
    patience: int | None = option(
        None, "early stop after N validations without improvement ('none' = never)", parse=parse_optional_int
    )
    eval_batch_size: int = option(16, "documents per evaluation batch")
    num_particles: int = option(1, "ELBO particles per step (--inference vi)")
    seed: int = option(
        0,
        "seed of the LoRA start, the batch order and the guide's draws (and of the data split "
        "unless --split-seed is given)",
    )
    progress: bool = option(True, "show a progress bar")
    checkpoint_every: int | None = option(
        None, "save a resumable checkpoint every N steps (in RUN.checkpoint/)", parse=parse_optional_int
    )
    gradient_checkpointing: bool = option(
        False, "recompute decoder layers in the backward pass: less memory for long sequences, about one more forward"
    )
    bf16: bool = option(False, "bfloat16 autocast of the base LM (for GPUs)")
    report_to: str = option(
        "none", "log training scalars live: none, or tensorboard (event files in --logging-dir)", choices=REPORT_TO
    )
    logging_dir: str | None = option(
        None,
        "folder of the --report-to event files (default: RUN.tensorboard next to the run folder; from Python, "
        "TensorBoard's runs/DATE_HOST)",
    )

    def __post_init__(self) -> None:
        positive_ints = ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "num_particles")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.grad_accum > self.batch_size:
            raise ValueError(
                f"grad_accum {self.grad_accum} exceeds batch_size {self.batch_size}: each micro-batch needs a document"
            )
        for name in ("lr", "guide_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.task_sampling, str):
            raise ValueError(f"task_sampling must be a string, got {self.task_sampling!r}")
        parse_task_sampling(self.task_sampling)
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        check_reporter_installed(self.report_to)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")
        if not (self.lr_tau_reference > 0 and math.isfinite(self.lr_tau_reference)):
            raise ValueError(f"lr_tau_reference must be a finite number > 0, got {self.lr_tau_reference!r}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience!r}")

    @property
    def temperature(self) -> float:
        """The task-sampling temperature T of ``task_sampling`` (1: proportional, inf: uniform)."""
        return parse_task_sampling(self.task_sampling)

    def learning_rate(self, tau: float | str) -> float:
        """The learning rate used at precision ``tau`` (see ``lr_tau_scaling``; a learned tau keeps ``lr``)."""
        if self.lr_tau_scaling and isinstance(tau, float) and 0 < tau < math.inf:
            lr = self.lr * tau / self.lr_tau_reference
            if not 0 < lr < 1e30:
                raise ValueError(
                    f"--lr-tau-scaling gives the learning rate lr * tau / lr_tau_reference = {self.lr:g} * {tau:g} / "
                    f"{self.lr_tau_reference:g} = {lr:g}, not a usable step size; change lr or lr_tau_reference"
                )
            return lr
        return self.lr

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step`` (1-based): step / warmup_steps during the warmup, then
        ``lr_schedule`` over the remaining steps (linear and cosine reach 0 just after the last step)."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        progress = (step - 1 - self.warmup_steps) / max(1, self.steps - self.warmup_steps)  # in [0, 1)
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)
