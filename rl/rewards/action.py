"""Action following (WorldCompass's interaction-following reward), with the evaluation's own estimator.

Per candidate, the chunk's latent frames (after the last prefix frame, or from the image for the first
chunk) go through ``eval.protocols.scoring.action_scores``: two-view poses between consecutive latent
frames (``eval.camera``), labelled with WorldCompass's rule (direction-angle translation classes,
Euler-threshold rotation classes, best of several translation thresholds; ``eval.actions``) and compared
with the commanded keys. Scores: ``action`` (the fine, per-axis accuracy by default, as WorldCompass
trains with; ``score: exact`` switches) and ``action_exact`` (81-class exact match). Frames too small for
feature matching (below about 128 px) give NaN. Candidates are scored in a thread pool (OpenCV releases
the GIL).
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Optional

import numpy as np
import torch

from eval.protocols.scoring import action_scores
from rl.config import ActionRewardConfig
from rl.rewards.base import Reward, RewardBatch, RewardResult

__all__ = ["ActionReward"]


class ActionReward(Reward):
    name = "action"
    scores = ("action", "action_exact")

    def __init__(self, cfg: ActionRewardConfig, executor: Optional[Executor] = None):
        self.cfg, self.executor = cfg, executor

    def _one(self, frames: np.ndarray, keys: torch.Tensor, K: torch.Tensor, batch: RewardBatch) -> dict:
        return action_scores(frames, K, keys, batch.steps, self.cfg.actions, self.cfg.estimator)

    def __call__(self, batch: RewardBatch) -> RewardResult:
        R = batch.rows
        frames = batch.frames.cpu().numpy()
        keys = batch.keys.cpu().bool()
        jobs = []
        for i in range(R):
            if batch.prev_frame is not None:  # step 0 is prefix -> chunk latent 0
                f = np.concatenate([batch.prev_frame[i].cpu().numpy()[None], frames[i]])
                k = torch.cat([torch.zeros(1, keys.shape[-1], dtype=torch.bool), keys[i]])
            else:  # the first chunk starts at the image: keys[0] is unused
                f, k = frames[i], keys[i]
            jobs.append((f, k, batch.K[i].cpu()))
        if self.executor is not None:
            results = list(self.executor.map(lambda a: self._one(*a, batch), jobs))
        else:
            results = [self._one(*a, batch) for a in jobs]
        fine = torch.tensor([float(r["fine_action_acc"]) for r in results], dtype=torch.float64)
        exact = torch.tensor([float(r["action_acc"]) for r in results], dtype=torch.float64)
        main = fine if self.cfg.score == "fine" else exact
        failed = [r["reason"] for r in results if r.get("reason")]
        diag = {"action/failed_share": len(failed) / max(1, R)}
        return RewardResult({"action": main, "action_exact": exact}, diag)
