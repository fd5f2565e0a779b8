"""Latent grouping: which video frames each latent frame covers, its pose and its action.

An autoencoder with temporal stride ``s`` encodes frame 0 alone and every later group of ``s``
frames into one latent, so ``F = 1 + s * (T - 1)`` frames give ``T`` latents. A latent's pose is
the pose of the last frame of its group; its action id comes from the relative motion between
consecutive latent poses (latent 0 has action 0). This module is the single place that rule lives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.actions import MotionThresholds, keys_to_action_id, poses_to_keys


def num_latents(num_frames: int, stride: int) -> int:
    """Latent count for ``num_frames`` frames; raises if the frames do not fill whole groups."""
    if stride < 1:
        raise ValueError(f"temporal stride must be >= 1, got {stride}")
    if num_frames < 1 or (num_frames - 1) % stride:
        ok = [1 + stride * k for k in range(max(0, (num_frames - 1) // stride - 1), (num_frames - 1) // stride + 2)]
        raise ValueError(
            f"{num_frames} frames do not group into latents with temporal stride {stride}: "
            f"need 1 + {stride}*k frames (nearby valid counts: {ok})"
        )
    return 1 + (num_frames - 1) // stride


def num_frames(num_latents_: int, stride: int) -> int:
    """Frame count that encodes to ``num_latents_`` latents with temporal stride ``stride``."""
    return 1 + stride * (num_latents_ - 1)


def latent_frame_index(num_frames_: int, stride: int) -> Tensor:
    """Index [T] of the frame whose pose each latent takes: the last frame of its group."""
    return torch.arange(num_latents(num_frames_, stride)) * stride


def latent_groups(num_frames_: int, stride: int) -> list[range]:
    """Frame ranges covered by each latent: [0], [1..s], [s+1..2s], ..."""
    T = num_latents(num_frames_, stride)
    return [range(0, 1)] + [range(1 + stride * (i - 1), 1 + stride * i) for i in range(1, T)]


def latent_poses(c2w: Tensor, stride: int) -> Tensor:
    """Per-latent poses [..., T, 4, 4] from per-frame poses [..., F, 4, 4]."""
    return c2w[..., latent_frame_index(c2w.shape[-3], stride), :, :]


def latent_intrinsics(K: Tensor, stride: int) -> Tensor:
    """Per-latent intrinsics [..., T, 3, 3] from per-frame intrinsics [..., F, 3, 3]."""
    return K[..., latent_frame_index(K.shape[-3], stride), :, :]


def latent_action_ids(c2w_latent: Tensor, thresholds: MotionThresholds = MotionThresholds()) -> Tensor:
    """81-class action id [..., T] from per-latent poses [..., T, 4, 4]; latent 0 gets 0."""
    return keys_to_action_id(poses_to_keys(c2w_latent, thresholds))


def latent_keys_from_frames(keys: Tensor, stride: int) -> Tensor:
    """Per-latent keys [T, 8] from per-frame held keys [F, 8]: a key counts if held in most of its group.

    Used when a source records the keys that drove it (games); latent 0 holds nothing.
    """
    groups = latent_groups(keys.shape[0], stride)
    out = torch.zeros(len(groups), keys.shape[1], dtype=torch.bool)
    for i, g in enumerate(groups[1:], start=1):
        out[i] = keys[g.start : g.stop].float().mean(0) > 0.5
    return out
