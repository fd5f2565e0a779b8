"""The conditioning image: read with OpenCV, centre-cropped to the bundle's aspect and resized to its size.

The crop and resize are the ones the trainer applies to training clips (centre crop to the target
aspect, INTER_AREA when shrinking, INTER_LINEAR when enlarging), so the model sees a first frame
framed like its training data. Intrinsics follow the same crop + resize in
:func:`infer.trajectory.normalized_intrinsics`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from torch import Tensor

from data.transforms import crop_box, crop_resize_frames

from infer.errors import InferError

ImageLike = Union[str, os.PathLike, np.ndarray]


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PNG/JPG (or any format OpenCV reads); alpha is dropped."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"image {path}: file not found")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InferError(f"image {path}: not a readable image (OpenCV could not decode it)")
    return np.ascontiguousarray(bgr[..., ::-1])


def as_rgb(image: ImageLike, where: str = "image") -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from a path or an array (uint8, or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
        raise InferError(f"{where}: expected an RGB array [H, W, 3], got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise InferError(f"{where}: float images must lie in [0, 1]")
        return np.round(arr * 255.0).astype(np.uint8)
    raise InferError(f"{where}: expected uint8 or float pixels, got {arr.dtype}")


def center_crop_box(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): the largest centred window of ``src_hw`` with the aspect of ``dst_hw``."""
    return crop_box(src_hw, dst_hw)


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop RGB uint8 [H, W, 3] to the aspect of (height, width) and resize to it."""
    return crop_resize_frames(image, crop_box(image.shape[:2], (height, width)), (height, width))


def to_video_tensor(image: np.ndarray) -> Tensor:
    """A video [1, 3, F, H, W] float32 in [-1, 1] from RGB uint8 frames [F, H, W, 3] (or one image [H, W, 3]: F = 1)."""
    frames = np.ascontiguousarray(image)
    if frames.ndim == 3:
        frames = frames[None]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)
    return x[None]


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """Frames uint8 [F, H, W, 3] from decoded video [1, 3, F, H, W] about [-1, 1]."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"to_uint8_frames: expected video [1, 3, F, H, W], got {list(video.shape)}")
    x = ((video[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
