"""The reward interface: a batch of decoded candidates in, named per-candidate scores out.

A reward never normalises, weights or selects: ``rl.advantages`` does that for all of them alike.
A score of NaN means "not defined for this candidate" (no pose could be estimated, no true render, no
revisited pose in the chunk); the trainer gives it zero advantage for that reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from data.actions import MotionSteps

__all__ = ["RewardBatch", "RewardResult", "Reward", "scored_mean"]


def scored_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-candidate mean [R] (float64, CPU) of values [R, L] over the latents ``mask`` [R, L] marks; NaN where none."""
    v, m = values.double().cpu(), mask.double().cpu()
    n = m.sum(1)
    return torch.where(n > 0, (v * m).sum(1) / n.clamp_min(1), torch.full_like(n, float("nan")))


@dataclass
class RewardBatch:
    """R candidates of one target chunk of L latents (rows of several groups), at latent rate.

    Frames are uint8 [..., H, W, 3] torch tensors on the device that decoded them; frame i of a chunk is
    the last video frame of latent i's group (the frame whose pose was commanded). ``scored`` marks the
    latents a reward may count: not the pinned conditioning image.
    """

    frames: Tensor  # [R, L, H, W, 3] the candidates
    first_frame: Tensor  # [R, H, W, 3] the conditioning image (frame 0 of the video)
    prev_frame: Optional[Tensor]  # [R, H, W, 3] the latent before the chunk (its last prefix frame); None for chunk 0
    keys: Tensor  # [R, L, 8] bool commanded held keys per latent (motion into each latent)
    c2w: Tensor  # [R, L, 4, 4] float64 commanded world poses
    K: Tensor  # [R, 3, 3] float64 pixel intrinsics
    steps: MotionSteps  # per-latent key increments (the translation scale of commanded motion)
    scored: Tensor  # [R, L] bool
    group: Tensor  # [R] int64 group id
    start: int  # index of the chunk's first latent in the video
    truth: Optional[Tensor] = None  # [R, L, H, W, 3] true render of the commanded path (synthetic world)
    truth_alt: Optional[Tensor] = None  # [R, L, H, W, 3] true render of the path not taken
    revisit_ref: Optional[Tensor] = None  # [R, L, H, W, 3] frame generated earlier at the identical pose
    revisit_mask: Optional[Tensor] = None  # [R, L] bool: latents with such a frame

    @property
    def rows(self) -> int:
        return int(self.frames.shape[0])

    @property
    def length(self) -> int:
        return int(self.frames.shape[1])


@dataclass
class RewardResult:
    """Per-candidate scores (name -> float64 [R] on the CPU, NaN = undefined) and scalar diagnostics."""

    scores: dict[str, Tensor]
    diagnostics: dict[str, float] = field(default_factory=dict)


class Reward:
    """Base of every reward: ``name`` and the ``scores`` it produces; ``__call__(batch) -> RewardResult``."""

    name: str = ""
    scores: tuple[str, ...] = ()

    def __call__(self, batch: RewardBatch) -> RewardResult:
        raise NotImplementedError(f"reward {self.name!r} must implement __call__")

    @staticmethod
    def nan(rows: int) -> Tensor:
        return torch.full((rows,), float("nan"), dtype=torch.float64)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scores": list(self.scores)}
