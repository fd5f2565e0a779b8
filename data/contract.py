"""The clip contract: what one training sample is, and its validation at the data boundary.

| key     | type                  | meaning                                                    |
|---------|-----------------------|------------------------------------------------------------|
| video   | uint8 [F, H, W, 3]    | RGB frames                                                 |
| c2w     | float32 [F, 4, 4]     | camera-to-world per frame, OpenCV convention               |
| K       | float32 [F, 3, 3]     | intrinsics in pixels for the stored resolution             |
| keys    | bool [F, 8]           | held keys per frame (see data.actions)                     |
| caption | str                   | may be empty                                               |
| meta    | dict                  | source, scene id, fps, trajectory kind, ...                |

Optional: ``depth`` float32 [F, H, W] (sources with exact geometry); ``latents`` float16/32
[C, T, h, w], the clip encoded by an autoencoder of temporal stride s (``F = 1 + s (T - 1)``,
written by ``python -m data.precompute``; the autoencoder is recorded in ``meta["latents"]``).
Tensors may be numpy arrays or torch tensors; validation accepts both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.geometry import is_rigid

REQUIRED_KEYS = ("video", "c2w", "K", "keys", "caption", "meta")
OPTIONAL_KEYS = ("depth", "latents")


class ClipError(ValueError):
    """A sample that breaks the clip contract; the message names where (shard/sample) and the key."""

    def __init__(self, where: str, key: str, problem: str):
        self.where, self.key, self.problem = where, key, problem
        super().__init__(f"{where}: key '{key}': {problem}")


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def validate_clip(clip: dict, where: str = "<clip>") -> None:
    """Raise :class:`ClipError` naming ``where`` and the key if ``clip`` breaks the contract."""
    for key in REQUIRED_KEYS:
        if key not in clip:
            raise ClipError(where, key, "missing")
    video = _np(clip["video"])
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ClipError(where, "video", f"expected uint8 [F, H, W, 3], got {video.dtype} {list(video.shape)}")
    F, H, W = video.shape[:3]
    if F < 1:
        raise ClipError(where, "video", "has no frames")
    shapes = {"c2w": (F, 4, 4), "K": (F, 3, 3), "keys": (F, 8)}
    for key, shape in shapes.items():
        arr = _np(clip[key])
        if tuple(arr.shape) != shape:
            raise ClipError(where, key, f"expected shape {list(shape)} for {F} frames, got {list(arr.shape)}")
        if key != "keys" and not np.isfinite(arr).all():
            raise ClipError(where, key, "contains NaN or inf")
    if _np(clip["keys"]).dtype != np.bool_:
        raise ClipError(where, "keys", f"expected bool, got {_np(clip['keys']).dtype}")
    rigid = is_rigid(torch.as_tensor(_np(clip["c2w"])))
    if not bool(rigid.all()):
        i = int((~rigid).nonzero()[0])
        raise ClipError(where, "c2w", f"frame {i} is not a rigid transform (R orthonormal with det +1, last row 0 0 0 1)")
    K = _np(clip["K"])
    if (K[:, 0, 0] <= 0).any() or (K[:, 1, 1] <= 0).any() or not np.allclose(K[:, 2], [0, 0, 1]):
        raise ClipError(where, "K", "focal lengths must be positive and the last row 0 0 1")
    if not isinstance(clip["caption"], str):
        raise ClipError(where, "caption", f"expected str, got {type(clip['caption']).__name__}")
    if not isinstance(clip["meta"], dict):
        raise ClipError(where, "meta", f"expected dict, got {type(clip['meta']).__name__}")
    if clip.get("latents") is not None:
        lat = _np(clip["latents"])
        info = clip["meta"].get("latents") if isinstance(clip["meta"], dict) else None
        if lat.ndim != 4 or not np.issubdtype(lat.dtype, np.floating):
            raise ClipError(where, "latents", f"expected float [C, T, h, w], got {lat.dtype} {list(lat.shape)}")
        if not isinstance(info, dict) or "temporal_stride" not in info:
            raise ClipError(where, "latents", "present but meta['latents'] does not record the autoencoder (temporal_stride, ...)")
        if 1 + int(info["temporal_stride"]) * (lat.shape[1] - 1) != F:
            raise ClipError(where, "latents", f"{lat.shape[1]} latents at temporal stride {info['temporal_stride']} do not cover {F} frames")
        if not np.isfinite(lat).all():
            raise ClipError(where, "latents", "contains NaN or inf")
    if "depth" in clip and clip["depth"] is not None:
        depth = _np(clip["depth"])
        if tuple(depth.shape) != (F, H, W):
            raise ClipError(where, "depth", f"expected shape {[F, H, W]}, got {list(depth.shape)}")
        if not np.isfinite(depth).all():
            raise ClipError(where, "depth", "contains NaN or inf")
