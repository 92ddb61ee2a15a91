"""ArviZ diagnostics of a fitted run (the only module that imports ArviZ).

``to_inference_data`` turns posterior draws into an ``arviz.InferenceData`` with
* ``posterior``: ``tau`` (learned runs; dim ``tau_group``), and per task (dim ``task``) the distance
  ||theta_d - Theta|| and the norm ||theta_d||;
* ``log_likelihood``: ``docs``, the log-likelihood of every held-out TEST document per draw (dim ``doc``):
  its log mean over draws is each document's elpd. These documents were not in the fit, so PSIS-LOO /
  WAIC (``az.loo``, ``az.compare``) on them are not valid estimates of anything; compare runs by their
  held-out elpd (``bora-pyro diagnose RUN RUN``, ``evaluation/comparison.py``);
* ``constant_data``: training tokens per task; ``elbo``: the training loss trace.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from ..data.batching import Split
from ..io.integrity import CorruptFile
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


# what every posterior.nc that bora_pyro writes holds: group -> a variable in it
EXPECTED_GROUPS = {"posterior": "norm", "log_likelihood": "docs", "constant_data": "train_tokens"}
_UNREADABLE = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError)  # what damage raises in h5py/xarray


def _read_hdf5(file: Path) -> None:
    """Read every attribute and value of an HDF5 file (raises on damage): h5netcdf, when it fails to open
    a damaged file, prints a traceback from its destructor; h5py reports the damage cleanly."""
    import h5py

    def read(name: str, item: h5py.Group | h5py.Dataset) -> None:
        dict(item.attrs)
        if isinstance(item, h5py.Dataset):
            item[()]

    with h5py.File(file, "r") as f:
        dict(f.attrs)
        f.visititems(read)


def _read(file: Path) -> az.InferenceData:
    """Read a netCDF file into memory, or raise :class:`CorruptFile` naming it."""
    try:
        _read_hdf5(file)
        with az.rc_context({"data.load": "eager"}):  # every value read now: damage surfaces here, not later
            return az.from_netcdf(file)
    except _UNREADABLE as err:
        raise CorruptFile(
            f"{file} is not a readable netCDF file ({type(err).__name__}: {' '.join(str(err).split())[:200]}): it is "
            "damaged or not bora_pyro's; train the run again with --posterior-samples N to write it anew"
        ) from None


def _check_groups(file: Path, idata: az.InferenceData) -> None:
    """Refuse a netCDF file without the groups and variables bora_pyro writes (see :data:`EXPECTED_GROUPS`)."""
    missing = [
        f"{group}.{var}"
        for group, var in EXPECTED_GROUPS.items()
        if group not in idata.groups() or var not in idata[group].data_vars
    ]
    if missing:
        raise CorruptFile(
            f"{file} is not a posterior written by bora_pyro: it lacks {', '.join(missing)} (it has groups "
            f"{idata.groups()}); train the run again with --posterior-samples N to write it anew"
        )


def load(path: str | Path) -> az.InferenceData:
    """The ArviZ data of a run folder (its posterior.nc) or of a posterior.nc file, read into memory.

    Raises FileNotFoundError if there is none, :class:`CorruptFile` naming the file if it cannot be read
    or lacks what bora_pyro writes (see :data:`EXPECTED_GROUPS`).
    """
    path = Path(path)
    file = path / POSTERIOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: train the run with posterior samples (bora-pyro train ... "
            "--posterior-samples N) to get ArviZ diagnostics"
        )
    idata = _read(file)
    _check_groups(file, idata)
    return idata


def summary(idata: az.InferenceData) -> pd.DataFrame:
    """``az.summary`` of tau and the per-task distances/norms."""
    names = [v for v in ("tau", "distance", "norm") if v in idata.posterior]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, var_names=names, kind="stats")


def plot(idata: az.InferenceData, out: Path) -> list[Path]:
    """Posterior of tau, forest plot of per-task distance (tasks by training size), ELBO trace."""
    written = []
    if "tau" in idata.posterior:
        tau = idata.posterior.tau.stack(sample=("chain", "draw"))
        samples = {str(g): tau.sel(tau_group=g).values for g in tau.tau_group.values}
        written.append(plots.plot_tau_guide(samples, out / "tau_guide_draws.png"))
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
