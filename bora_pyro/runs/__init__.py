"""Runs: the spec of a run (spec.py), building its model (build.py), training it into a run folder (train.py,
folder.py), and loading it back (load.py)."""

from .load import LoadedRun, load_run
from .spec import SECTIONS, AdapterConfig, RemoteCodeRefused, RunSpec
from .train import RunStopped, adapt_run, checkpoint_folder, complete_run, resume_run, train_run

__all__ = [
    "SECTIONS",
    "AdapterConfig",
    "LoadedRun",
    "RemoteCodeRefused",
    "RunSpec",
    "RunStopped",
    "adapt_run",
    "checkpoint_folder",
    "complete_run",
    "load_run",
    "resume_run",
    "train_run",
]
