"""Live training scalars for an experiment tracker (``--report-to``, HF Trainer's ``report_to`` convention).

``tensorboard`` writes event files (``tensorboard --logdir DIR``) with, per step, ``train/nll_per_token``,
``train/perplexity``, ``train/prior_per_token``, ``train/loss_per_token`` (the objective), ``train/grad_norm``
(before clipping), ``train/learning_rate`` and, for VI, ``train/elbo_per_token``; per validation
``eval/perplexity``, ``eval/macro_perplexity``, ``eval/loglik_per_token`` and, for a learned tau,
``tau/<group>`` (its guide median). Only the main process of a data-parallel run writes.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path

REPORT_TO = ("none", "tensorboard")
_TRAIN = {
    "train_nll_per_token": "train/nll_per_token",
    "train_ppl": "train/perplexity",
    "prior_per_token": "train/prior_per_token",
    "loss_per_token": "train/loss_per_token",
    "grad_norm": "train/grad_norm",
    "lr": "train/learning_rate",
}
_EVAL = {
    "valid_ppl": "eval/perplexity",
    "valid_macro_ppl": "eval/macro_perplexity",
    "valid_loglik_per_token": "eval/loglik_per_token",
}


def check_reporter_installed(report_to: str) -> None:
    """Refuse, in one line and before any work, a tracker whose package is missing."""
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install 'bora-pyro[tensorboard]'")


class Reporter:
    """Sends the rows of the training history to a tracker; this base class sends them nowhere."""

    def train(self, row: Mapping[str, float], variational: bool) -> None:
        """One step's row of ``FitResult.state.losses``."""

    def validation(self, row: Mapping[str, float]) -> None:
        """One row of ``FitResult.state.evals``."""

    def close(self) -> None:
        """Flush and release the tracker."""


class TensorBoardReporter(Reporter):
    """Scalars in TensorBoard event files under ``logging_dir`` (None: TensorBoard's ``runs/DATE_HOST``)."""

    def __init__(self, logging_dir: str | Path | None) -> None:
        check_reporter_installed("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=None if logging_dir is None else str(logging_dir))

    def _scalars(self, row: Mapping[str, float], names: Mapping[str, str]) -> None:
        for key, tag in names.items():
            value = row.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, int(row["step"]))

    def train(self, row: Mapping[str, float], variational: bool) -> None:
        self._scalars(row, _TRAIN)
        if variational:
            self.writer.add_scalar("train/elbo_per_token", -row["loss_per_token"], int(row["step"]))

    def validation(self, row: Mapping[str, float]) -> None:
        self._scalars(row, _EVAL)
        self._scalars(row, {k: "tau/" + k.split(".", 1)[1] for k in row if k.startswith("tau_median.")})
        self.writer.flush()  # a validation is a natural point for a live view to catch up

    def close(self) -> None:
        self.writer.close()


def open_reporter(report_to: str, logging_dir: str | Path | None, is_main: bool = True) -> Reporter:
    """The reporter ``report_to`` names (one of :data:`REPORT_TO`); a silent one on other processes."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "none" or not is_main:
        return Reporter()
    return TensorBoardReporter(logging_dir)
