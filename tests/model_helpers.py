"""Helpers shared by the model tests (imported as a sibling module, like dist_worker)."""

from __future__ import annotations

import math

import torch


def randomize(model: torch.nn.Module, seed: int = 0, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give every parameter a non-trivial value (the default init zeroes gates, outputs and the new branches).

    Matrices get N(0, 1/fan_in); vectors 0 (norm weights 1) plus N(0, 0.01); names containing a ``skip``
    substring keep their init.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model
