"""Exact-geometry reward on the synthetic world: the scene is known, so the right video is known.

    geometry = mean_i PSNR_cap(gen_i, true_i) − alt_weight · mean_i max(0, PSNR_cap(gen_i, alt_i) − PSNR_cap(gen_i, true_i))

over the chunk's scored latents: fidelity to the true render of the commanded path, minus a penalty for
looking more like the path not taken (by default the camera standing still, which punishes freezing).
PSNR is capped at ``psnr_cap``, so the true render scores exactly the cap, its maximum (the penalty is
zero there: nothing is closer to the truth than the truth). NaN without a true render (non-synthetic clips).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eval.metrics import psnr
from rl.config import GeometryRewardConfig
from rl.rewards.base import Reward, RewardBatch, RewardResult, scored_mean

__all__ = ["ExactGeometryReward", "frame_psnr"]


def frame_psnr(a: Tensor, b: Tensor, cap: float) -> Tensor:
    """Capped PSNR (dB) per frame of uint8 frames a, b [R, L, H, W, 3] -> float64 [R, L] (eval.metrics.psnr)."""
    R, L = a.shape[:2]
    return psnr(a.reshape(R * L, *a.shape[2:]), b.reshape(R * L, *b.shape[2:]).to(a.device)).clamp(max=cap).reshape(R, L)


class ExactGeometryReward(Reward):
    name = "geometry"
    scores = ("geometry",)

    def __init__(self, cfg: GeometryRewardConfig):
        self.cfg = cfg

    def __call__(self, batch: RewardBatch) -> RewardResult:
        if batch.truth is None:
            return RewardResult({"geometry": self.nan(batch.rows)}, {"geometry/defined_share": 0.0})
        cap = self.cfg.psnr_cap
        mask = batch.scored
        own = frame_psnr(batch.frames, batch.truth, cap)
        score = scored_mean(own, mask)
        diag = {"geometry/psnr": float(score.nanmean()) if bool(torch.isfinite(score).any()) else float("nan"), "geometry/defined_share": 1.0}
        if batch.truth_alt is not None and self.cfg.alt_weight:
            alt = frame_psnr(batch.frames, batch.truth_alt, cap)
            penalty = scored_mean((alt - own).clamp_min(0.0), mask)
            score = score - self.cfg.alt_weight * penalty
            diag["geometry/alt_psnr"] = float(scored_mean(alt, mask).nanmean())
            diag["geometry/alt_penalty"] = float(penalty.nanmean())
        return RewardResult({"geometry": score}, diag)
