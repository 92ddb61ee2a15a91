"""Task names: ``global`` is reserved for Theta, the shared adapter, wherever tasks are named."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

GLOBAL = "global"  # Theta's folder in `bora-pyro export`, and its task name in `generate` / LoadedRun.generate


def check_task_names(tasks: Sequence[str], source: str) -> None:
    """Refuse duplicated task names and a task named ``global`` (it could not be told apart from Theta).

    ``source`` (the corpus spec, or the caller) starts the error message.
    """
    dupes = sorted(t for t, n in Counter(tasks).items() if n > 1)
    if dupes:
        raise ValueError(f"{source}: task names must be unique, duplicated: {dupes}")
    if GLOBAL in tasks:
        raise ValueError(
            f"{source}: a task is named {GLOBAL!r}, a name reserved for Theta (the shared adapter): export writes "
            f"Theta to the folder {GLOBAL!r} and generate addresses it as task {GLOBAL!r}; rename the task in the "
            f"data (e.g. to '{GLOBAL}_task')"
        )
