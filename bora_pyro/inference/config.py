"""Training configuration (validated on construction)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How the SVI loop runs.

    ``lr_tau_scaling`` is the paper's rule of a learning rate proportional to tau, anchored so that
    ``tau == lr_tau_reference`` gets ``lr`` (only finite tau > 0; tau = 0 and inf keep ``lr``).
    ``patience`` stops after that many validations without a better validation log-likelihood
    (None: run all steps). The best validated state is restored at the end either way.
    """

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    guide_lr: float = 1e-2  # the guide's scales, a learned tau's guide, B-LoRA gates (see models.guides)
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at the last step
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    lr_tau_scaling: bool = False
    lr_tau_reference: float = 100.0
    eval_every: int = 25
    patience: int | None = None
    eval_batch_size: int = 16
    num_particles: int = 1
    seed: int = 0
    progress: bool = True
    checkpoint_every: int | None = None  # steps between checkpoints (needs a checkpoint folder)
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward pass (long sequences)
    bf16: bool = False  # bfloat16 autocast of the LM (GPU)

    def __post_init__(self) -> None:
        positive_ints = ("steps", "batch_size", "eval_every", "eval_batch_size", "num_particles")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "guide_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
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

    def learning_rate(self, tau: float | str) -> float:
        """The learning rate used at precision ``tau`` (see ``lr_tau_scaling``; a learned tau keeps ``lr``)."""
        if self.lr_tau_scaling and isinstance(tau, float) and 0 < tau < math.inf:
            return self.lr * tau / self.lr_tau_reference
        return self.lr

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step`` (1-based) under ``lr_schedule``."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.steps))
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)
