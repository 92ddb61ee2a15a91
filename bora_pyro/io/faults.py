"""Crash points: named moments inside our writes at which a fault-injection test can kill the process.

``BORA_PYRO_CRASH_AT=NAME:K`` makes the K-th call of ``crash_point(NAME)`` in this process kill it
with SIGKILL, as a power cut, the OOM killer or ``kill -9`` would. ``experiments/fault_injection.py``
and the tests use it to show that a kill at any of these moments leaves the previous or the new
state complete, never a half-written one. Unset (always, outside such tests) it costs a dictionary
lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "BORA_PYRO_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if ``$BORA_PYRO_CRASH_AT`` is ``name:K`` and this is the K-th time."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or wanted.rpartition(":")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(wanted.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
