"""Quality drift anchored to frame 0 (WorldCompass's drift idea, with weight-free image statistics).

Never an absolute aesthetic score (that is easy to hack): each statistic of a generated frame is
compared with the same statistic of the conditioning image, and the reward is minus the weighted
change, averaged over the chunk's scored latents:

    drift = − mean_i Σ_s w_s · |s(frame_i) − s(frame_0)|

with s in: sharpness (log variance of the Laplacian of the luma), exposure (mean luma in [0, 1]),
clipping (share of pixels with luma below 5/255 or above 250/255: over-exposure and crushed blacks),
colourfulness (Hasler and Süsstrunk's metric, / 100). 0 is the best score. Runs batched on the frames'
device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.config import DriftRewardConfig
from rl.rewards.base import Reward, RewardBatch, RewardResult, scored_mean

__all__ = ["QualityDriftReward", "image_stats"]

_LUMA = (0.299, 0.587, 0.114)
_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def image_stats(frames: Tensor) -> dict[str, Tensor]:
    """Statistics of uint8 frames [N, H, W, 3] -> {sharpness, exposure, clipping, colourfulness}, each float32 [N]."""
    x = frames.float() / 255.0  # [N, H, W, 3]
    luma = (x * torch.tensor(_LUMA, device=x.device)).sum(-1)  # [N, H, W]
    lap = F.conv2d(luma[:, None], torch.tensor(_LAPLACE, device=x.device)[None, None])  # valid: [N, 1, H-2, W-2]
    sharp = torch.log(lap.flatten(1).var(dim=1, unbiased=False) + 1e-6)
    exposure = luma.flatten(1).mean(1)
    clipping = ((luma < 5 / 255) | (luma > 250 / 255)).float().flatten(1).mean(1)
    rgb = x * 255.0
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colour = (rg.flatten(1).std(1, unbiased=False).square() + yb.flatten(1).std(1, unbiased=False).square()).sqrt() + \
        0.3 * (rg.flatten(1).mean(1).square() + yb.flatten(1).mean(1).square()).sqrt()
    return {"sharpness": sharp, "exposure": exposure, "clipping": clipping, "colourfulness": colour / 100.0}


class QualityDriftReward(Reward):
    name = "drift"
    scores = ("drift",)

    def __init__(self, cfg: DriftRewardConfig):
        self.cfg = cfg

    def __call__(self, batch: RewardBatch) -> RewardResult:
        R, L = batch.rows, batch.length
        H, W = batch.frames.shape[2:4]
        gen = image_stats(batch.frames.reshape(R * L, H, W, 3))
        ref = image_stats(batch.first_frame)
        mask = batch.scored.to(batch.frames.device).float()
        total = torch.zeros(R, L, device=batch.frames.device)
        diag = {}
        for name in ("sharpness", "exposure", "clipping", "colourfulness"):
            delta = (gen[name].reshape(R, L) - ref[name][:, None]).abs()
            total = total + float(getattr(self.cfg, name)) * delta
            diag[f"drift/{name}"] = float(((delta * mask).sum() / mask.sum().clamp_min(1)).cpu())
        return RewardResult({"drift": -scored_mean(total, batch.scored)}, diag)
