"""Stopping a fit cleanly: Ctrl-C / SIGTERM become a request to stop after the current step.

A first SIGINT or SIGTERM is remembered and announced; the loop finishes its step, saves a
checkpoint (when checkpointing) and returns an ``interrupted`` result, which the run writes as a
run folder marked ``interrupted``. A second Ctrl-C aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager that records SIGINT / SIGTERM instead of dying (main thread only; elsewhere a no-op).

    ``signal_number`` is the first signal received (None if none).
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after this step (press Ctrl-C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signal_number is not None
