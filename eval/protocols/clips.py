"""Evaluation clips: contract clips fitted to a model's resolution, with their synthetic scene when known.

A clip is centre-cropped to the model's aspect ratio and resized (``K`` follows, through
``data.geometry``), the way training windows are made with ``crop="center"``. When a clip comes from
the procedural synthetic world, its scene is rebuilt from the seed recorded in ``meta`` and
*verified*: it must re-render the clip's first frame at the stored pose and intrinsics with PSNR of
at least ``scene_match_psnr`` (the stored video may be lossy mp4). A clip whose scene does not
verify has no true render, and the reason says why; nothing is silently assumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from data.transforms import crop_resize
from eval.metrics import psnr

__all__ = ["EvalClip", "SCENE_SEED_KEYS", "fit_frames", "load_clips", "prepare_clip", "scene_from_meta"]

# meta keys that may hold a synthetic clip's scene seed, in the order they are tried.
SCENE_SEED_KEYS = ("scene_seed", "seed")


def fit_frames(video: np.ndarray, K: Tensor, height: int, width: int) -> tuple[np.ndarray, Tensor]:
    """Centre-crop frames uint8 [F, H0, W0, 3] to the aspect of (height, width) and resize; K [F, 3, 3] follows."""
    return crop_resize(video, K, height, width)


@dataclass
class EvalClip:
    """One clip at the evaluation resolution (video, pixel K, world poses) and, for synthetic data, its scene."""

    name: str
    video: np.ndarray  # uint8 [F, H, W, 3] at the evaluation resolution
    K: Tensor  # float64 [F, 3, 3] pixel intrinsics for ``video``
    c2w: Tensor  # float64 [F, 4, 4] world poses as stored
    caption: str
    meta: dict
    native_K: Tensor  # float64 [3, 3] intrinsics of the stored first frame
    native_hw: tuple[int, int]
    scene: Optional[Any] = None  # data.synthetic.scene.Scene when the seed verified
    scene_note: str = ""  # why there is no scene (empty when there is one)
    extras: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.video.shape[0])

    def num_latents(self, stride: int) -> int:
        """Latents the clip's frames fill (the trailing frames of an incomplete group are ignored)."""
        return (self.num_frames - 1) // stride + 1

    def render(self, c2w: Tensor) -> np.ndarray:
        """The true frames uint8 [N, H, W, 3] at world poses c2w [N, 4, 4], fitted like the clip's video."""
        if self.scene is None:
            raise RuntimeError(f"{self.name}: no synthetic scene to render ({self.scene_note})")
        from data.synthetic import render

        H0, W0 = self.native_hw
        rgb, _ = render(self.scene, torch.as_tensor(c2w).float(), self.native_K.float(), H0, W0,
                        supersample=int(self.meta.get("supersample", 1)))
        N = rgb.shape[0]
        frames, _ = fit_frames(rgb.cpu().numpy(), self.native_K.expand(N, 3, 3), self.video.shape[1], self.video.shape[2])
        return frames


def scene_from_meta(meta: dict) -> tuple[Optional[Any], str]:
    """(Scene, "") rebuilt from a synthetic clip's meta, or (None, reason)."""
    seed = next((meta[k] for k in SCENE_SEED_KEYS if isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool)), None)
    if seed is None:
        return None, f"meta has no integer scene seed (looked for {list(SCENE_SEED_KEYS)}; source={meta.get('source')!r})"
    from data.synthetic import Scene, SceneConfig
    cfg_dict = meta.get("scene_config")
    try:
        cfg = SceneConfig(**cfg_dict) if isinstance(cfg_dict, dict) else None
    except TypeError as e:
        return None, f"meta scene_config does not fit SceneConfig: {e}"
    return Scene.random(int(seed), cfg), ""


def prepare_clip(clip: dict, name: str, height: int, width: int, scene_match_psnr: float = 30.0) -> EvalClip:
    """An :class:`EvalClip` from a contract clip dict (numpy or torch values)."""
    video = np.asarray(clip["video"])
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: key 'video' must be uint8 [F, H, W, 3], got {video.dtype} {list(video.shape)}")
    F, H0, W0 = video.shape[:3]
    K_native = torch.as_tensor(np.asarray(clip["K"]), dtype=torch.float64)
    c2w = torch.as_tensor(np.asarray(clip["c2w"]), dtype=torch.float64)
    if K_native.shape != (F, 3, 3) or c2w.shape != (F, 4, 4):
        raise ValueError(f"{name}: keys 'K' / 'c2w' must be [{F}, 3, 3] / [{F}, 4, 4], got {list(K_native.shape)} / {list(c2w.shape)}")
    frames, K = fit_frames(video, K_native, height, width)
    meta = dict(clip.get("meta") or {})
    out = EvalClip(name, frames, K, c2w, str(clip.get("caption") or ""), meta, K_native[0], (H0, W0))
    scene, note = scene_from_meta(meta)
    if scene is not None:
        from data.synthetic import render

        try:
            rgb, _ = render(scene, c2w[:1].float(), K_native[0].float(), H0, W0, supersample=int(meta.get("supersample", 1)))
            match = min(float(psnr(rgb.cpu(), torch.from_numpy(video[:1]))[0]), 1e3)
        except ValueError as e:
            scene, note, match = None, f"scene seed does not render the clip's first pose: {e}", float("nan")
        if scene is not None and not match >= scene_match_psnr:
            scene, note = None, (f"scene seed re-renders the first frame at {match:.1f} dB < {scene_match_psnr} dB: "
                                 "not the scene the clip was rendered in")
        out.extras["scene_match_psnr"] = match
    out.scene, out.scene_note = scene, note
    return out


def load_clips(data_dir: str | os.PathLike, num: int) -> list[tuple[str, dict]]:
    """The first ``num`` clips (name, contract dict) of a shard dataset directory, in index order."""
    from data.indexed import ShardDataset

    ds = ShardDataset(data_dir)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: the dataset holds no clips")
    out = []
    for i in range(min(num, len(ds))):
        clip = ds[i]
        out.append((f"{i}:{clip.get('__key__', i)}", clip))
    return out
