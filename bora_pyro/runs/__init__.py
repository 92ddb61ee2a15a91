"""Runs: the spec of a run (spec.py), building its model (build.py), training it into a run folder (train.py,
run_files.py), its checkpoints (checkpoints.py), resuming it (resume.py), and loading it back (load.py)."""

from ..models.adapter import AdapterConfig
from .checkpoints import checkpoint_folder
from .load import LoadedRun, load_run
from .resume import complete_run, resume_run
from .spec import SECTIONS, RemoteCodeRefused, RunSpec
from .train import RunStopped, adapt_run, train_run

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
