"""Rollout paths: start images from any clip-contract dataset and the camera paths the policy is told to follow.

Everything here is composed from the evaluation's and the data package's own pieces, so RL trains on
the paths the evaluation scores:

- start clips: ``eval.protocols.clips`` (fitted to the model's resolution; a synthetic clip's scene is
  rebuilt from its seed and verified against the stored first frame);
- paths: ``eval.protocols.walks.plan_path``: in a verified synthetic scene the data package's
  collision-free planner (``random`` composite actions or an out-and-back ``revisit``) with the exact
  render of every latent; elsewhere WorldCompass-style random composite actions from the clip's first
  frame and pose;
- conditioning: the inference rule (``eval.protocols.runner.VideoModel.generate``): poses rebased to the
  first camera, action ids from the poses with the bundle's thresholds, normalised intrinsics.

Randomness is a function of (seed, rank, step, group) only, so a resumed run plans the same paths and
paths can be planned ahead in a thread while the previous step trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from data.geometry import invert_rigid, normalize_intrinsics, rebase_to_first
from data.latents import latent_action_ids
from eval.protocols.clips import EvalClip, load_clips, prepare_clip
from eval.protocols.runner import EvalSettings
from eval.protocols.walks import EvalPath, plan_path
from rl.config import PathConfig

__all__ = ["RLPath", "PathSource", "path_conditioning", "target_chunk"]


def target_chunk(curriculum: str, step: int, lo: int, hi: int, rng: Optional[np.random.Generator] = None) -> int:
    """The 1-based target chunk of RL step ``step`` (1-based): min2max cycles lo..hi, max2min hi..lo, random draws."""
    if not 1 <= lo <= hi:
        raise ValueError(f"target_chunk: need 1 <= lo <= hi, got {lo}, {hi}")
    span = hi - lo + 1
    if curriculum == "min2max":
        return lo + (step - 1) % span
    if curriculum == "max2min":
        return hi - (step - 1) % span
    if curriculum == "random":
        if rng is None:
            raise ValueError("target_chunk: the random curriculum needs a generator")
        return lo + int(rng.integers(span))
    raise ValueError(f"unknown curriculum {curriculum!r}")


def path_conditioning(c2w: Tensor, K: Tensor, settings: EvalSettings) -> tuple[Tensor, Tensor, Tensor]:
    """The inference conditioning of a latent-rate path: (actions int64 [T], w2c float32 [T, 4, 4], K float32 [T, 3, 3]).

    c2w [T, 4, 4] world poses; K [3, 3] pixel intrinsics at the model's resolution.
    """
    c2w = rebase_to_first(torch.as_tensor(c2w, dtype=torch.float64))
    T = c2w.shape[0]
    actions = latent_action_ids(c2w, settings.thresholds)
    Kn = normalize_intrinsics(torch.as_tensor(K, dtype=torch.float64).expand(T, 3, 3), settings.width, settings.height)
    return actions, invert_rigid(c2w).float(), Kn.float()


@dataclass
class RLPath:
    """One group's path: the clip, the planned path (``EvalPath``: world poses, keys, image, truth, revisit
    pairs) and its model conditioning (``path_conditioning``)."""

    clip: EvalClip
    path: EvalPath
    actions: Tensor  # [T] int64
    w2c: Tensor  # [T, 4, 4]
    K: Tensor  # [T, 3, 3] normalised
    K_pixel: Tensor  # [3, 3] float64 pixel intrinsics (for pose estimation)
    kind: str

    @property
    def num_latents(self) -> int:
        return int(self.path.c2w.shape[0])


class PathSource:
    """Plans seeded paths over the first ``cfg.num_clips`` clips of a dataset (see the module docstring)."""

    def __init__(self, cfg: PathConfig, data_dir: str, settings: EvalSettings, stride: int, seed: int, rank: int = 0):
        self.cfg, self.data_dir, self.settings, self.stride = cfg, str(data_dir), settings, int(stride)
        self.seed, self.rank = int(seed), int(rank)
        self._raw: Optional[list[tuple[str, dict]]] = None
        self._clips: dict[int, EvalClip] = {}

    def _load(self) -> list[tuple[str, dict]]:
        if self._raw is None:
            from pathlib import Path

            if not (Path(self.data_dir) / "index.json").exists():
                raise FileNotFoundError(f"stage.paths: no dataset at {self.data_dir} (index.json missing): start images come from a "
                                        "clip-contract dataset (stage.paths.data or data.path)")
            self._raw = load_clips(self.data_dir, self.cfg.num_clips)
        return self._raw

    def clip(self, index: int) -> EvalClip:
        """Clip ``index`` fitted to the model's resolution (prepared once)."""
        if index not in self._clips:
            name, raw = self._load()[index]
            self._clips[index] = prepare_clip(raw, name, self.settings.height, self.settings.width, self.cfg.scene_match_psnr)
        return self._clips[index]

    def rng(self, step: int, group: int, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(step), int(group), int(salt)])

    def plan(self, step: int, group: int, num_latents: int, salt: int = 0) -> RLPath:
        """The path of group ``group`` at step ``step``: ``num_latents`` latents from a seeded clip and kind."""
        rng = self.rng(step, group, salt)
        index = int(rng.integers(len(self._load())))
        clip = self.clip(index)
        kind = self.cfg.kind
        if kind == "mixed":
            kind = "revisit" if rng.random() < self.cfg.revisit_prob else "random"
        if kind == "revisit" and num_latents < 3:
            kind = "random"  # out, turn, back needs three latents
        path = plan_path(kind, clip, num_latents, self.stride, self.settings.steps, rng, self.cfg.walk)
        actions, w2c, K = path_conditioning(path.c2w, clip.K[0], self.settings)
        return RLPath(clip, path, actions, w2c, K, clip.K[0].clone(), kind)

    def alt_truth(self, p: RLPath, start: int, length: int, step: int, group: int) -> Optional[np.ndarray]:
        """True latent frames uint8 [length, H, W, 3] of the path not taken from latent ``start`` on (synthetic only).

        ``still``: the camera stays where it was before the chunk; ``random``: a fresh collision-free
        path branched off that pose (falls back to ``still`` when none can be planned there).
        """
        truth = p.path.truth
        if truth is None:
            return None
        anchor = max(start - 1, 0)
        still = np.repeat(truth[anchor][None], length, axis=0)
        if self.cfg.alt_path == "still":
            return still
        rng = self.rng(step, group, 7)
        alt = plan_path("random", p.clip, length + (start > 0), self.stride, self.settings.steps, rng, self.cfg.walk,
                        start=p.path.c2w[anchor])
        if alt.truth is None:
            return still
        return alt.truth[1:] if start > 0 else alt.truth
