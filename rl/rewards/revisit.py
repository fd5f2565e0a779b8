"""Revisit consistency on loop paths: coming back to a pose, the world should look as it did.

For every scored latent of the chunk whose commanded pose is identical to an earlier latent's (an
out-and-back path returns through its outbound poses), the candidate frame is compared with the frame
generated at that earlier latent (from the shared prefix, or earlier in the same candidate):

    revisit = mean over such latents of PSNR_cap(frame_i, frame_twin(i))

NaN for a chunk with no revisited pose (the trainer gives it zero advantage). This is the WorldPlay
self-consistency measure the ``long`` evaluation protocol reports, as a reward.
"""

from __future__ import annotations

from rl.config import RevisitRewardConfig
from rl.rewards.base import Reward, RewardBatch, RewardResult, scored_mean
from rl.rewards.geometry import frame_psnr

__all__ = ["RevisitReward"]


class RevisitReward(Reward):
    name = "revisit"
    scores = ("revisit",)

    def __init__(self, cfg: RevisitRewardConfig):
        self.cfg = cfg

    def __call__(self, batch: RewardBatch) -> RewardResult:
        if batch.revisit_ref is None or batch.revisit_mask is None:
            return RewardResult({"revisit": self.nan(batch.rows)}, {"revisit/defined_share": 0.0})
        mask = batch.revisit_mask.cpu() & batch.scored.cpu()
        score = scored_mean(frame_psnr(batch.frames, batch.revisit_ref, self.cfg.psnr_cap), mask)
        return RewardResult({"revisit": score}, {"revisit/defined_share": float(mask.any(1).double().mean())})
