"""Inference: the SVI training loop (svi.py), its options (config.py), optimizer, stopping rules and checkpoints.

The guides it fits (AutoDelta for MAP, the mean-field AutoNormal for VI) live in ``models/guides.py``; they are
re-exported here because ``fit`` is where a user meets them."""

from ..models.guides import INFERENCE, make_guide
from .config import TrainConfig
from .svi import FitResult, fit

__all__ = ["INFERENCE", "FitResult", "TrainConfig", "fit", "make_guide"]
