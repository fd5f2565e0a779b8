"""Honest wall-clock timing: the device is synchronised before every clock read.

CUDA work is asynchronous, so a ``perf_counter`` read after launching kernels measures the launch,
not the work. :func:`synchronize` waits for the device; :class:`Stopwatch` does it on entry and exit.
"""

from __future__ import annotations

import time
from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["synchronize", "Stopwatch", "summarize"]


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait until all queued work on ``device`` has finished (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds``; synchronises ``device`` at both ends."""

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)
        self.seconds = float("nan")
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """median, p90 (linear interpolation), mean, min, max and count of a list of latencies in seconds."""
    if len(seconds) == 0:
        return {"count": 0}
    a = np.asarray(seconds, dtype=np.float64)
    return {
        "count": int(a.size),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }
