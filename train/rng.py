"""Random-number state: seeding, and capture/restore of every generator a rank uses.

A resumed run equals the uninterrupted one only if each rank continues the exact random streams it
had: Python ``random``, NumPy's global generator, torch CPU and the current CUDA device.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Large odd multiplier so per-rank seeds never collide with the global seed of another run.
_RANK_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own streams (noise, dropout, augmentation), derived from the run seed."""
    return (seed + _RANK_STRIDE * (rank + 1)) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch CPU and all CUDA devices with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of this process's generators (CUDA: the current device only, one device per rank)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain ints, lists and tensors only, so that ``torch.load(weights_only=True)`` reads it back.
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any], where: str = "<rng state>") -> None:
    """Restore a :func:`capture_rng_state` snapshot; ``where`` names the file in errors."""
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"{where}: RNG state lacks '{key}'")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
