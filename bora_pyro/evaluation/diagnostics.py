"""ArviZ diagnostics of a fitted run (the only module that imports ArviZ).

``to_inference_data`` turns posterior draws into an ``arviz.InferenceData`` with
* ``posterior``: ``tau`` (learned runs; dim ``tau_group``), and per task (dim ``task``) the distance
  ||theta_d - Theta|| and the norm ||theta_d||;
* ``log_likelihood``: ``docs``, the log-likelihood of every held-out document per draw (dim ``doc``),
  so that ``az.loo`` / ``az.waic`` / ``az.compare`` can rank runs;
* ``constant_data``: training tokens per task; ``elbo``: the training loss trace.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from ..data.batching import Split
from ..models.bora import BoRA
from . import plots
from .predictive import DrawSummary

POSTERIOR_FILE = "posterior.nc"


def to_inference_data(
    bora: BoRA,
    draws: DrawSummary,
    doc_loglik: torch.Tensor,
    split: Split,
    train_tokens: np.ndarray,
    losses: pd.DataFrame | None = None,
) -> az.InferenceData:
    """Shapes: doc_loglik [draws, docs] (from :func:`bora_pyro.predictive.posterior_predictive`)."""
    distance_of_mean = bora.distance_to_global()
    posterior = {"norm": draws.norm[None]}  # [chain=1, draw, task]
    dims = {
        "norm": ["task"],
        "distance": ["task"],
        "tau": ["tau_group"],
        "docs": ["doc"],
        "train_tokens": ["task"],
        "distance_of_mean": ["task"],
    }
    coords = {"task": list(bora.tasks), "doc": np.arange(len(split)), "tau_group": bora.prior.tau_groups()}
    if draws.distance is not None:
        posterior["distance"] = draws.distance[None]
    if draws.tau is not None:
        posterior["tau"] = draws.tau[None]
    idata = az.from_dict(
        posterior=posterior,
        log_likelihood={"docs": doc_loglik.numpy()[None]},
        constant_data={
            "train_tokens": np.asarray(train_tokens),
            "doc_task": np.asarray(split.task_index),
            **({} if distance_of_mean is None else {"distance_of_mean": distance_of_mean.cpu().numpy()}),
        },
        coords=coords,
        dims={**dims, "doc_task": ["doc"]},
    )
    if losses is not None and not losses.empty:
        idata.add_groups(
            {
                "elbo": xr.Dataset(
                    {"loss_per_token": ("step", losses.loss_per_token.to_numpy())},
                    coords={"step": losses.step.to_numpy()},
                )
            }
        )
    return idata


def load(path: str | Path) -> az.InferenceData:
    path = Path(path)
    file = path / POSTERIOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: train the run with posterior samples (bora-pyro train ... "
            "--posterior-samples N) to get ArviZ diagnostics"
        )
    return az.from_netcdf(file)


def summary(idata: az.InferenceData) -> pd.DataFrame:
    """``az.summary`` of tau and the per-task distances/norms."""
    names = [v for v in ("tau", "distance", "norm") if v in idata.posterior]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=names, kind="stats")


def compare(runs: Mapping[str, az.InferenceData]) -> pd.DataFrame:
    """``az.compare`` (PSIS-LOO on held-out documents) over several runs of the same test split."""
    sizes = {name: idata.log_likelihood.docs.shape[-1] for name, idata in runs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"runs were scored on different held-out documents (counts {sizes}); compare runs of one corpus split"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.compare(dict(runs), ic="loo")


def plot(idata: az.InferenceData, out: Path) -> list[Path]:
    """Posterior of tau, forest plot of per-task distance (tasks by training size), ELBO trace."""
    written = []
    if "tau" in idata.posterior:
        tau = idata.posterior.tau.stack(sample=("chain", "draw"))
        samples = {str(g): tau.sel(tau_group=g).values for g in tau.tau_group.values}
        written.append(plots.plot_tau_posterior(samples, out / "tau_posterior.png"))
    if "distance" in idata.posterior:
        distance = idata.posterior.distance
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interval = az.hdi(idata, var_names=["distance"], hdi_prob=0.9).distance
        frame = pd.DataFrame(
            {
                "task": distance.task.values,
                "mean": distance.mean(("chain", "draw")).values,
                "low": interval.sel(hdi="lower").values,
                "high": interval.sel(hdi="higher").values,
                "train_tokens": idata.constant_data.train_tokens.values,
            }
        )
        if "distance_of_mean" in idata.constant_data:
            frame["distance_of_mean"] = idata.constant_data.distance_of_mean.values
        written.append(plots.plot_distance_forest(frame, out / "distance_forest.png"))
    if "elbo" in idata.groups():
        trace = idata.elbo.loss_per_token
        written.append(plots.plot_elbo_trace(trace.step.values, trace.values, out / "elbo_trace.png"))
    return written
