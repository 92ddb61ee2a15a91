"""Inference drivers: guides (AutoDelta / AutoNormal) and the SVI training loop."""

from ..models.guides import INFERENCE, make_guide
from .config import TrainConfig
from .svi import FitResult, fit

__all__ = ["INFERENCE", "FitResult", "TrainConfig", "fit", "make_guide"]
