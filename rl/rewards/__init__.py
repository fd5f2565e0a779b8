"""Rewards of the RL stage, behind one interface (``rl.rewards.base``): decoded candidates in, named scores out.

| reward | scores | needs |
|---|---|---|
| ``action`` | ``action`` (fine accuracy), ``action_exact`` | frames of >= ~128 px (eval.camera's feature matching) |
| ``geometry`` | ``geometry`` | a verified synthetic scene (true renders of the commanded path and of the path not taken) |
| ``drift`` | ``drift`` | nothing (frame 0 is the anchor) |
| ``revisit`` | ``revisit`` | a loop path whose chunk returns to an earlier pose |
| learned | its ``name`` | a local TorchScript file or factory (``stage.rewards.learned``) |

:func:`build_rewards` builds the rewards whose scores ``stage.weights`` names (weight 0 = logged only);
:func:`score_batch` runs them and merges their scores.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Optional

import torch

from rl.config import RewardsConfig
from rl.rewards.action import ActionReward
from rl.rewards.base import Reward, RewardBatch, RewardResult
from rl.rewards.drift import QualityDriftReward
from rl.rewards.geometry import ExactGeometryReward
from rl.rewards.learned import LearnedReward
from rl.rewards.revisit import RevisitReward

__all__ = ["Reward", "RewardBatch", "RewardResult", "BUILTIN_SCORES", "build_rewards", "score_batch"]

BUILTIN_SCORES = {"action": "action", "action_exact": "action", "geometry": "geometry", "drift": "drift", "revisit": "revisit"}


def build_rewards(cfg: RewardsConfig, names: list[str], device: torch.device | str = "cpu",
                  executor: Optional[Executor] = None) -> list[Reward]:
    """The rewards producing the scores ``names`` (the keys of ``stage.weights``); KeyError for an unknown name."""
    learned = {c.name: c for c in cfg.learned}
    clash = sorted(set(learned) & set(BUILTIN_SCORES))
    if clash:
        raise ValueError(f"stage.rewards.learned: names {clash} are taken by built-in rewards")
    unknown = sorted(set(names) - set(BUILTIN_SCORES) - set(learned))
    if unknown:
        raise KeyError(f"stage.weights: unknown reward score(s) {unknown}; built-in: {sorted(BUILTIN_SCORES)}, "
                       f"learned (stage.rewards.learned): {sorted(learned)}")
    kinds = list(dict.fromkeys(BUILTIN_SCORES[n] for n in names if n in BUILTIN_SCORES))
    out: list[Reward] = []
    for kind in kinds:
        if kind == "action":
            out.append(ActionReward(cfg.action, executor))
        elif kind == "geometry":
            out.append(ExactGeometryReward(cfg.geometry))
        elif kind == "drift":
            out.append(QualityDriftReward(cfg.drift))
        elif kind == "revisit":
            out.append(RevisitReward(cfg.revisit))
    out.extend(LearnedReward(learned[n], device) for n in names if n in learned)
    return out


def score_batch(rewards: list[Reward], batch: RewardBatch) -> RewardResult:
    """Every reward's scores on ``batch``, merged (names must not collide)."""
    scores: dict[str, torch.Tensor] = {}
    diag: dict[str, float] = {}
    for reward in rewards:
        res = reward(batch)
        for k, v in res.scores.items():
            if k in scores:
                raise ValueError(f"reward {reward.name!r} produced score {k!r}, already produced by another reward")
            if v.shape != (batch.rows,):
                raise ValueError(f"reward {reward.name!r}: score {k!r} has shape {tuple(v.shape)}, expected [{batch.rows}]")
            scores[k] = v.double().cpu()
        diag.update(res.diagnostics)
    return RewardResult(scores, diag)
