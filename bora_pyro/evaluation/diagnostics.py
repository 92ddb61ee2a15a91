"""ArviZ diagnostics of a fitted run (the only module that imports ArviZ).

``to_inference_data`` turns posterior draws into an ``arviz.InferenceData`` with
* ``posterior``: ``tau`` (learned runs; dim ``tau_group``), and per task (dim ``task``) the distance
  ||theta_d - Theta|| and the norm ||theta_d||;
* ``log_likelihood``: ``docs``, the log-likelihood of every held-out TEST document per draw (dim ``doc``):
  its log mean over draws is each document's elpd. These documents were not in the fit, so PSIS-LOO /
  WAIC (``az.loo``, ``az.compare``) on them are not valid estimates of anything; compare runs by their
  held-out elpd (``bora-pyro diagnose RUN RUN``, ``evaluation/comparison.py``);
* ``log_likelihood``: ``train_docs`` (VI runs), the log-likelihood per draw of a sample of TRAINING documents
  (dim ``train_doc``, at most ``--curvature-docs`` per task): these were in the fit, so PSIS-LOO on them is
  valid (:func:`loo_training`; reliable where Pareto k-hat is small, which needs many draws);
* ``constant_data``: training tokens per task; ``elbo``: the training loss trace.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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
from ..models.readout import distance_to_global
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
    train: tuple[Split, torch.Tensor] | None = None,
) -> az.InferenceData:
    """Shapes: doc_loglik [draws, docs] (from :func:`bora_pyro.predictive.posterior_predictive`); ``train``: a
    subset of the training documents and their log-likelihoods [draws, train docs] under the same draws."""
    distance_of_mean = distance_to_global(bora)
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
    log_likelihood = {"docs": doc_loglik.numpy()[None]}
    constant = {"train_tokens": np.asarray(train_tokens), "doc_task": np.asarray(split.task_index)}
    if train is not None:
        log_likelihood["train_docs"] = train[1].numpy()[None]
        constant["train_doc_task"] = np.asarray(train[0].task_index)
        coords["train_doc"] = np.arange(len(train[0]))
        dims.update(train_docs=["train_doc"], train_doc_task=["train_doc"])
    if draws.distance is not None:
        posterior["distance"] = draws.distance[None]
    if draws.tau is not None:
        posterior["tau"] = draws.tau[None]
    idata = az.from_dict(
        posterior=posterior,
        log_likelihood=log_likelihood,
        constant_data={
            **constant,
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


@dataclass(frozen=True)
class LooReport:
    """PSIS-LOO on the training documents of a run's ArviZ file: ``pointwise`` has one row per document (task,
    elpd_loo, khat); ``good_k``: the k-hat below which a document's estimate is reliable for this many draws;
    ``warnings``: what ArviZ said (shown, never silenced)."""

    elpd: float
    se: float
    p_loo: float
    draws: int
    good_k: float
    pointwise: pd.DataFrame
    warnings: tuple[str, ...]

    def line(self) -> str:
        """One line: the estimate and how many documents' k-hat say it is unreliable."""
        k = self.pointwise.khat.to_numpy()
        bad = int((k > self.good_k).sum())
        verdict = (
            "reliable"
            if bad == 0
            else f"UNRELIABLE for {bad} of {len(k)} (k-hat > {self.good_k:.2f}: more draws, "
            "--posterior-samples N, or these documents sway the fit)"
        )
        return (
            f"PSIS-LOO on {len(k)} training documents (in the fit; {self.draws} draws): elpd_loo {self.elpd:.1f} "
            f"(se {self.se:.1f}), p_loo {self.p_loo:.1f}; Pareto k-hat max {k.max():.2f}: {verdict}"
        )


def loo_training(idata: az.InferenceData, tasks: list[str] | None = None) -> LooReport | None:
    """PSIS-LOO (``az.loo``) on the training documents kept in ``idata`` (None where it keeps none: MAP runs,
    whose draws are one point, and files written before)."""
    if "log_likelihood" not in idata.groups() or "train_docs" not in idata.log_likelihood:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loo = az.loo(idata, var_name="train_docs", pointwise=True)
    draws = int(idata.log_likelihood.sizes["draw"] * idata.log_likelihood.sizes["chain"])
    task_index = idata.constant_data.train_doc_task.values
    names = np.asarray(tasks or idata.posterior.task.values.tolist())[task_index]
    pointwise = pd.DataFrame({"task": names, "elpd_loo": loo.loo_i.values, "khat": loo.pareto_k.values})
    good_k = float(getattr(loo, "good_k", 0.7))
    said = tuple(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
    return LooReport(float(loo.elpd_loo), float(loo.se), float(loo.p_loo), draws, good_k, pointwise, said)


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
