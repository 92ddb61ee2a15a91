"""The LoRA adapters of a BoRA model and how they are fitted: :class:`AdapterConfig` (every field a CLI option)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..io.task_store import STORES
from ..nn.targets import ALL_LINEAR, REGEX_PREFIX
from ..options import option, parse_csv
from .guides import INFERENCE


def parse_targets(text: str) -> tuple[str, ...]:
    """--targets: comma-separated names, or one ``re:PATTERN`` taken whole (a pattern may hold commas)."""
    return (text,) if text.startswith(REGEX_PREFIX) else parse_csv(text)


@dataclass(frozen=True)
class AdapterConfig:
    """The LoRA adapters and how they are fitted (every field is a CLI option)."""

    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA scaling numerator: the update is scaled by alpha / r")
    targets: tuple[str, ...] | None = option(
        None,
        "layers to adapt, comma-separated, matched as module-path suffixes like PEFT (q_proj or "
        "self_attn.q_proj), all-linear (every linear layer but the output head), or re:PATTERN (a regular "
        "expression the whole module path must match, commas kept); default by model type: "
        "q_proj,v_proj for LLaMA / OPT, c_attn for GPT-2",
        parse=parse_targets,
    )
    lora_dropout: float = option(
        0.0, "dropout on the input of each LoRA branch in training steps (PEFT's lora_dropout)"
    )
    inference: str = option(
        "map", "map: AutoDelta guide (the paper's MAP estimate); vi: mean-field Normal guide", choices=INFERENCE
    )
    guide_init_scale: float = option(
        1e-3,
        "--inference vi: the start of the guide's scales (of z_d in the non-centred form, where the prior's is 1; "
        "of theta_d in the centred one; of log tau); see the scale_ratio column of per_task.csv",
    )
    init_peft: str | None = option(
        None,
        "start Theta and every task from this PEFT LoRA adapter folder (same rank and target modules)",
        metavar="DIR",
    )
    task_store: str = option(
        "auto",
        "where the MAP guide's per-task rows and their AdamW moments live: memory; disk (memory-mapped files in "
        "RUN.store/, then RUN/task_store/: memory grows with the rows a step touches, not with the number of "
        "tasks); auto (disk when they need more than 8 GB)",
        choices=STORES,
    )
    task_subsampling: bool = option(
        True,
        "a step samples, scores and updates only the tasks of its batch, their "
        "prior terms weighted to an unbiased estimate (cost independent of the number "
        "of tasks); --no-task-subsampling: every task's prior term at every step",
    )

    def __post_init__(self) -> None:
        if not (0 < self.guide_init_scale < math.inf):
            raise ValueError(f"guide_init_scale must be a finite number > 0, got {self.guide_init_scale!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {self.inference!r}")
        if isinstance(self.targets, str):  # a regular expression (or all-linear), as BoRA(targets=...) takes it
            plain = self.targets == ALL_LINEAR or self.targets.startswith(REGEX_PREFIX)
            object.__setattr__(self, "targets", (self.targets if plain else REGEX_PREFIX + self.targets,))
        elif self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
