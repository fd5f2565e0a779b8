"""Spatial framing shared by training, inference and evaluation: crop to an aspect, resize, K follows.

One rule everywhere (the trainer's windows, the player's conditioning image and camera path, the
evaluation clips): take the largest window of the source with the target aspect (centred, or at a
random offset for training augmentation), resize it to the target size, and update the pixel
intrinsics with exactly that crop and resize (``data.geometry``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from data.geometry import crop_intrinsics, resize_intrinsics


def crop_box(src_hw: tuple[int, int], dst_hw: tuple[int, int], rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): the largest window of ``src_hw`` with the aspect of ``dst_hw``.

    Centred when ``rng`` is None, else at a uniformly random offset.
    """
    H, W = src_hw
    h, w = dst_hw
    target = w / h
    ch, cw = (H, int(round(H * target))) if W / H > target else (int(round(W / target)), W)
    ch, cw = max(1, min(ch, H)), max(1, min(cw, W))
    if rng is None:
        return (H - ch) // 2, (W - cw) // 2, ch, cw
    return int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1)), ch, cw


def crop_resize_intrinsics(K: Tensor, box: tuple[int, int, int, int], dst_hw: tuple[int, int]) -> Tensor:
    """Pixel intrinsics [..., 3, 3] after cropping ``box`` (from :func:`crop_box`) and resizing to ``dst_hw``."""
    top, left, ch, cw = box
    return resize_intrinsics(crop_intrinsics(torch.as_tensor(K, dtype=torch.float64), top, left), (ch, cw), dst_hw)


def crop_resize_frames(frames: np.ndarray, box: tuple[int, int, int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Crop RGB uint8 frames [..., H, W, 3] to ``box`` and resize to ``dst_hw`` (area when shrinking)."""
    top, left, ch, cw = box
    out = frames[..., top : top + ch, left : left + cw, :]
    h, w = dst_hw
    if (ch, cw) != (h, w):
        interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
        flat = out.reshape(-1, ch, cw, 3)
        out = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in flat]).reshape(*out.shape[:-3], h, w, 3)
    return np.ascontiguousarray(out)


def crop_resize(video: np.ndarray, K: np.ndarray | Tensor, height: int, width: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, Tensor]:
    """Frame a clip: video uint8 [F, H, W, 3] and K [F, 3, 3] -> [F, height, width, 3] and float64 K."""
    box = crop_box(video.shape[-3:-1], (height, width), rng)
    return crop_resize_frames(video, box, (height, width)), crop_resize_intrinsics(K, box, (height, width))


def parse_wxh(text: str) -> tuple[int, int]:
    """'640x360' -> (width, height); ValueError naming the text otherwise (the CLIs' --size)."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--size must look like 640x360 (width x height), got {text!r}")
    return int(m.group(1)), int(m.group(2))
