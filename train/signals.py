"""Preemption: turn SIGTERM / SIGUSR1 into a flag that the loop checks at step boundaries.

The handler only records the signal; the trainer agrees on it across ranks, saves a checkpoint,
writes ``status.json`` and ends with :data:`PREEMPTED_EXIT_CODE`, on which the SLURM launcher
requeues the job (the requeued run resumes with ``checkpoint.resume=latest``).
"""

from __future__ import annotations

import signal
import threading
import warnings
from types import FrameType
from typing import Optional

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager installing flag-setting handlers for ``signals`` (main thread only).

    ``requested`` becomes True on the first signal; ``signal_name`` says which. Previous handlers
    are restored on exit. Outside the main thread (where Python cannot install handlers) it warns
    and stays inert.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def request(self, name: str = "manual") -> None:
        """Ask for a clean stop as if a signal had arrived (tests, custom watchdogs)."""
        self.requested = True
        self.signal_name = self.signal_name or name

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionHandler: not in the main thread, signals will not stop the run cleanly")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
