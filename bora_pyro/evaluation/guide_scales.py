"""Have a VI guide's scales converged? At the optimum of the ELBO a mean-field Normal's sd of theta_dj is
1 / sqrt(lam_dj + tau) (exactly, for a Gaussian likelihood), with lam_dj the curvature of task d's
log-likelihood: the collapsed report's messages give that target, and the ratio of the guide's sd to it
says how far the scales are from converged (the guide starts them at ``--guide-init-scale``, 1e-3 by
default, far below a target of ~1 / sqrt(tau) for the many coordinates the data barely inform)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..models.bora import BoRA
from ..models.collapsed_tau import Messages
from .messages import factor_taus, guide_moments

UNCONVERGED = 0.5  # a scale below half of its target counts as not converged


def scale_ratios(bora: BoRA, messages: Messages) -> dict[str, torch.Tensor]:
    """The guide's sd over its target 1 / sqrt(lam + tau), per coordinate. Shapes: -> name -> [D, *shape]."""
    _, scales = guide_moments(bora)
    taus = factor_taus(bora)
    return {n: (scales[n].cpu() * (messages.lam[n].double().cpu() + taus[n]).sqrt()).float() for n in scales}


def scale_report(bora: BoRA, messages: Messages) -> tuple[pd.DataFrame, np.ndarray]:
    """Per task: ``scale_ratio`` (median over its coordinates of the guide's sd over the target) and
    ``scale_unconverged`` (the share below :data:`UNCONVERGED`); and the log10 ratios of every coordinate
    (a sample of at most 10^5 per task, for a histogram). Shapes: -> frame [tasks], [tasks, sample]."""
    ratios = scale_ratios(bora, messages)
    flat = torch.cat([r.flatten(1) for r in ratios.values()], dim=1)  # [D, coordinates]
    sample = flat[:, torch.linspace(0, flat.shape[1] - 1, min(flat.shape[1], 100_000)).long()]
    frame = pd.DataFrame(
        {
            "scale_ratio": flat.median(1).values.numpy(),
            "scale_unconverged": (flat < UNCONVERGED).double().mean(1).numpy(),
        }
    )
    return frame, np.log10(sample.clamp_min(1e-30).numpy())


def scale_warning(frame: pd.DataFrame) -> str | None:
    """One line when the guide's scales have not converged (a task's median ratio below 0.5), else None."""
    worst = float(frame.scale_ratio.min())
    if not worst < UNCONVERGED or math.isnan(worst):
        return None
    share = float(frame.scale_unconverged.mean())
    return (
        f"the VI guide's scales have not converged: {share:.0%} of them are below half of 1/sqrt(lambda + tau) "
        f"(median ratio {float(frame.scale_ratio.median()):.2g}, lowest task {worst:.2g}); its posterior draws, and "
        "a learned tau's guide interval, are too narrow. The collapsed tau posterior (tau_posterior.csv) does not "
        "depend on them; train longer, or start the scales higher with --guide-init-scale"
    )
