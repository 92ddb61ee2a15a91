"""Pyro models: the BoRA hierarchical prior, its exact limits, and the LM likelihood."""

from .bora import BoRA
from .prior import HIERARCHICAL, INDEPENDENT, POOLED, HierarchicalPrior, parse_tau, prior_mode

__all__ = ["BoRA", "HIERARCHICAL", "INDEPENDENT", "POOLED", "HierarchicalPrior", "parse_tau", "prior_mode"]
