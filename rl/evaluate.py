"""Reward evaluation of a policy on fixed paths: the stage's sample hook and the before/after report.

Each of ``eval_groups`` fixed paths (seeded by ``eval_seed``, planned like training paths) is rolled out
for ``eval_chunks`` chunks by the inference sampler, one sample per path with a fixed seed, and every
chunk is scored by every reward of the run (the first chunk without its pinned image latent). The
result is the mean of each score over chunks and paths: comparable across checkpoints and bundles
because paths and noise are the same.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from eval.protocols.runner import EvalSettings, settings_from_sampling
from models.rollout import Rollout
from rl.config import RLStageConfig
from rl.paths import PathSource
from rl.rewards import Reward, build_rewards, score_batch
from rl.rollouts import reward_batch, roll_out_group

__all__ = ["rl_settings", "encode_captions", "RewardEvaluator", "evaluate_bundle"]


def rl_settings(sampling: Mapping[str, Any], scfg: RLStageConfig, where: str) -> EvalSettings:
    """The bundle's sampling settings with the RL sampler's changes: the Euler ODE, ``rollout_steps`` /
    ``shift`` when set, no guidance (NFT trains the conditional policy; WorldCompass samples without CFG)."""
    settings = settings_from_sampling(sampling, where, steps=scfg.rollout_steps)
    r = settings.rollout
    if r.mode != "ar":
        raise ValueError(f"{where}: stage rl trains chunk-wise autoregressive models; the bundle samples in {r.mode!r} mode")
    if r.guidance != 1.0:
        warnings.warn(f"{where}: the bundle samples with guidance {r.guidance}; RL rollouts use none (guidance 1)", stacklevel=2)
    rcfg = dataclasses.replace(r, guidance=1.0, schedule="euler", renoise=None, shift=r.shift if scfg.shift is None else float(scfg.shift))
    rcfg.validate()
    return dataclasses.replace(settings, rollout=rcfg)


def encode_captions(text_encoder: Optional[nn.Module], model: nn.Module, captions: list[str], device: torch.device):
    """(tokens [P, L, D], mask or None) for the captions, or None without a text stream (as inference encodes)."""
    if text_encoder is None or getattr(getattr(model, "cfg", None), "text_dim", 0) <= 0 or not any(captions):
        return None
    tokens, mask = text_encoder.encode(list(captions))
    if tokens.shape[1] == 0:
        return None
    return tokens.to(device), (None if bool(mask.all()) else mask.to(device))


class RewardEvaluator:
    """Scores a policy on fixed paths (see the module docstring)."""

    def __init__(self, scfg: RLStageConfig, data_dir: str, settings: EvalSettings, autoencoder: nn.Module,
                 rewards: list[Reward], device: torch.device):
        self.scfg, self.settings, self.autoencoder, self.rewards, self.device = scfg, settings, autoencoder, rewards, device
        self.source = PathSource(scfg.paths, data_dir, settings, int(autoencoder.temporal_stride), seed=scfg.eval_seed, rank=0)
        self.revisit = any(r.name == "revisit" for r in rewards)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, text_encoder: Optional[nn.Module] = None) -> dict[str, float]:
        """Mean of every score over the fixed paths' chunks (NaN where a score is never defined)."""
        s = self.scfg
        if s.eval_groups == 0:
            return {}
        C = self.settings.rollout.chunk_size
        T = s.eval_chunks * C
        paths = [self.source.plan(0, g, T) for g in range(s.eval_groups)]
        was = model.training
        model.eval()
        try:
            rollout = Rollout(model, self.settings.rollout)
            g = torch.Generator(device=self.device).manual_seed(s.eval_seed)
            text = encode_captions(text_encoder, model, [p.clip.caption for p in paths], self.device)
            gr = roll_out_group(rollout, self.autoencoder, paths, s.eval_chunks, 1, g, self.device, text)
        finally:
            model.train(was)
        latents = torch.cat([gr.prefix.latents, gr.record.latents.to(gr.prefix.latents.dtype)], dim=2)
        pinned = [c.pinned for c in gr.prefix.chunks] + [gr.record.pinned]
        values: dict[str, list[torch.Tensor]] = {}
        for k in range(s.eval_chunks):
            start = k * C
            batch = reward_batch(self.autoencoder, paths, latents[:, :, :start], latents[:, :, start:start + C], 1, pinned[k],
                                 self.settings.steps, decode_pad=s.decode_pad, revisit=self.revisit,
                                 alt_truth=lambda gi, p, start=start: self.source.alt_truth(p, start, C, 0, gi))
            for name, v in score_batch(self.rewards, batch).scores.items():
                values.setdefault(name, []).append(v)
        out = {}
        for name, vs in values.items():
            v = torch.cat(vs).double()
            ok = torch.isfinite(v)
            out[name] = float(v[ok].mean()) if bool(ok.any()) else math.nan
        return out


def evaluate_bundle(bundle_dir: str | Path, scfg: RLStageConfig, data_dir: str, device: str = "cpu") -> dict[str, float]:
    """The rewards of a bundle on the run's fixed evaluation paths (the RL stage's sampler and rewards)."""
    from concurrent.futures import ThreadPoolExecutor

    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir, device=device)
    dev = torch.device(device)
    settings = rl_settings(bundle.sampling, scfg, f"bundle {bundle_dir}")
    with ThreadPoolExecutor(max(1, scfg.rewards.workers)) as pool:
        rewards = build_rewards(scfg.rewards, scfg.score_names, dev, pool)
        ev = RewardEvaluator(scfg, data_dir, settings, bundle.autoencoder.eval(), rewards, dev)
        return ev.evaluate(bundle.model, bundle.text_encoder)
