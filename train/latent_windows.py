"""Training windows cut from precomputed latents (``python -m data.precompute``).

Latents were encoded at a fixed resolution, so windows are taken on the latent grid (any
``num_latents`` consecutive latents; a window need not start at latent 0, as in WorldPlay's
memory samples) and no crop or resize happens: the clip's stored size must be the training size.
Poses and intrinsics are those of each latent's last frame (``data.latents``), rebased to the
window's first latent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.actions import MotionThresholds, keys_to_action_id
from data.geometry import invert_rigid, normalize_intrinsics, rebase_to_first
from data.latents import latent_action_ids, latent_frame_index, latent_keys_from_frames


def make_latent_window(clip: dict, cfg: Any, rng: np.random.Generator, thresholds: MotionThresholds) -> dict[str, Any]:
    """A window dict like ``train.data.make_window``'s, with ``latents`` [C, T, h, w] instead of ``video``."""
    where = str(clip.get("__key__", "<clip>"))
    lat = np.asarray(clip["latents"])
    info = clip["meta"]["latents"]
    stride = int(info["temporal_stride"])
    F, H, W = clip["video"].shape[:3]
    if (H, W) != (cfg.height, cfg.width):
        raise ValueError(f"{where}: latents were precomputed at {H}x{W} but data.height/width is {cfg.height}x{cfg.width}; precompute again at the training size")
    T_all, T = lat.shape[1], cfg.num_latents
    if T_all < T:
        raise ValueError(f"{where}: {T_all} precomputed latents are fewer than data.num_latents={T}")
    l0 = 0 if cfg.window == "start" else int(rng.integers(0, T_all - T + 1))
    frame_of = latent_frame_index(F, stride)[l0 : l0 + T]  # the frame whose pose each latent takes
    c2w = rebase_to_first(torch.as_tensor(np.asarray(clip["c2w"])[frame_of.numpy()], dtype=torch.float64))
    if cfg.action_source == "keys":
        first = 0 if l0 == 0 else 1 + stride * (l0 - 1)
        keys = torch.as_tensor(np.asarray(clip["keys"][first : int(frame_of[-1]) + 1]))
        if l0 > 0:  # group frames like a window whose first latent is a single frame
            keys = torch.cat([torch.zeros(1, keys.shape[1], dtype=torch.bool), keys[stride:]])
        actions = keys_to_action_id(latent_keys_from_frames(keys, stride))
    else:
        actions = latent_action_ids(c2w, thresholds)
    K = torch.as_tensor(np.asarray(clip["K"])[frame_of.numpy()], dtype=torch.float64)
    return {
        "latents": torch.from_numpy(np.ascontiguousarray(lat[:, l0 : l0 + T])).float(),
        "c2w": c2w.float(),
        "w2c": invert_rigid(c2w).float(),
        "K": normalize_intrinsics(K, W, H).float(),
        "K_pixels": K.float(),
        "actions": actions.long(),
        "caption": clip.get("caption", ""),
        "key": where,
    }
