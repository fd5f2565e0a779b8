"""What goes in and out of the play server besides JSON: uploads, start images, encoded frames.

* **Uploads** are untrusted bytes. :func:`decode_upload` accepts a still image (anything OpenCV
  decodes: PNG, JPEG, WebP, BMP, ...) or a video (anything PyAV decodes: MP4, WebM, MOV), within a
  byte limit, a pixel limit and a frame limit, and says how it will be framed. The framing is the
  one rule of :mod:`data.transforms` (centre crop to the bundle's aspect, then resize); an image
  whose crop would keep less than :data:`MIN_KEPT` of it (a panorama for a square model) is refused
  with a message rather than silently cut to a sliver. Nothing an upload names is ever used as a
  path: the server re-encodes what it decoded under its own file names.
* **Start gallery**: the first frames (and the first latents' frames with their camera, for
  "start from this clip") of a dataset in the clip contract, or the images of a folder.
* **Frames** go to the page as JPEG (or WebP) bytes, one WebSocket message each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from data.transforms import crop_box, crop_resize_frames
from data.video import VideoError, decode_mp4_bytes
from infer.errors import InferError

__all__ = [
    "MIN_KEPT",
    "MIN_SIDE",
    "MAX_PIXELS",
    "Upload",
    "StartItem",
    "framing",
    "decode_upload",
    "encode_frames",
    "load_gallery",
]

MIN_KEPT = 0.25  # refuse an upload whose centre crop to the model's aspect keeps less than this fraction
MIN_SIDE = 8  # pixels: smaller uploads are refused (nothing to see)
MAX_PIXELS = 40_000_000  # per frame: refuse decompression bombs before framing them
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Upload:
    """A decoded upload: RGB frames [F, H, W, 3] (F = 1 for an image) and how they will be framed."""

    kind: str  # "image" | "video"
    frames: np.ndarray
    note: str  # how it is framed, for the page


@dataclass
class StartItem:
    """One entry of the start gallery: a frame (and, from a dataset, the clip's first frames and camera)."""

    label: str
    image: np.ndarray  # RGB uint8 [H, W, 3], as stored
    video: Optional[np.ndarray] = None  # RGB uint8 [F, H, W, 3]: the clip's first frames (dataset only)
    c2w: Optional[np.ndarray] = None  # [F, 4, 4] per frame
    K: Optional[np.ndarray] = None  # [F, 3, 3] pixel intrinsics per frame
    thumbnail: bytes = field(default=b"", repr=False)  # JPEG of the framed first frame


def _ratio(h: int, w: int) -> str:
    return f"{w / h:.2f}:1"


def framing(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str:
    """How a frame of ``src_hw`` becomes the model's ``dst_hw`` (a sentence for the page).

    Raises InferError when the source is too small or its aspect ratio is so far from the model's
    that the centre crop would keep less than :data:`MIN_KEPT` of it.
    """
    (h, w), (H, W) = src_hw, dst_hw
    if min(h, w) < MIN_SIDE:
        raise InferError(f"the upload is {w}x{h} pixels; it needs at least {MIN_SIDE} pixels on each side")
    top, left, ch, cw = crop_box((h, w), (H, W))
    kept = ch * cw / (h * w)
    if kept < MIN_KEPT:
        raise InferError(
            f"odd aspect ratio: the upload is {w}x{h} ({_ratio(h, w)}) and the model makes {W}x{H} frames "
            f"({_ratio(H, W)}); a centre crop would keep only {kept:.0%} of it. Crop it closer to {_ratio(H, W)} first"
        )
    if (ch, cw) == (h, w):
        return f"resized from {w}x{h} to {W}x{H} (same aspect ratio, nothing cropped)"
    side = "left and right" if cw < w else "top and bottom"
    return (f"centre-cropped from {w}x{h} ({_ratio(h, w)}) to {cw}x{ch}, the model's {_ratio(H, W)} "
            f"({kept:.0%} kept, cut at {side}), then resized to {W}x{H}")


def decode_upload(data: bytes, dst_hw: tuple[int, int], *, limit_bytes: int, max_frames: int, name: str = "upload") -> Upload:
    """Decode untrusted upload bytes into an image or a video for a ``dst_hw`` model; InferError says what is wrong."""
    if len(data) == 0:
        raise InferError(f"{name}: the file is empty")
    if len(data) > limit_bytes:
        raise InferError(f"{name}: {len(data) / 2**20:.2f} MiB is over the upload limit of {limit_bytes / 2**20:.2f} MiB")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is not None:
        if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS:
            raise InferError(f"{name}: {bgr.shape[1]}x{bgr.shape[0]} pixels is too large (limit {MAX_PIXELS // 10**6} megapixels)")
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        return Upload("image", rgb[None], framing(rgb.shape[:2], dst_hw))
    try:
        video = decode_mp4_bytes(data, name, max_frames=max_frames)
    except VideoError as e:
        if "more than" in e.problem:
            raise InferError(f"{name}: the video has {e.problem}") from None
        raise InferError(
            f"{name}: neither an image (PNG, JPEG, WebP, BMP) nor a video (MP4, WebM, MOV) that can be decoded"
        ) from None
    if video.shape[1] * video.shape[2] > MAX_PIXELS:
        raise InferError(f"{name}: {video.shape[2]}x{video.shape[1]} video frames are too large")
    return Upload("video", video, framing(video.shape[1:3], dst_hw))


def encode_frames(frames: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> list[bytes]:
    """RGB uint8 frames [F, H, W, 3] -> one JPEG (or WebP) byte string per frame."""
    if fmt == "jpeg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "webp":
        ext, params = ".webp", [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    else:
        raise ValueError(f"frame format must be 'jpeg' or 'webp', got {fmt!r}")
    out = []
    for f in frames:
        ok, enc = cv2.imencode(ext, np.ascontiguousarray(f[..., ::-1]), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {f.shape} frame as {fmt}")
        out.append(enc.tobytes())
    return out


def _thumbnail(image: np.ndarray, dst_hw: tuple[int, int]) -> bytes:
    return encode_frames(crop_resize_frames(image, crop_box(image.shape[:2], dst_hw), dst_hw)[None])[0]


def load_gallery(
    dst_hw: tuple[int, int],
    *,
    data: Optional[str | os.PathLike] = None,
    images: Optional[str | os.PathLike] = None,
    count: int = 12,
    clip_frames: int = 1,
) -> list[StartItem]:
    """Start items: the first ``count`` clips of a contract dataset (first frame, plus its first
    ``clip_frames`` frames with their camera) and/or the images of a folder (sorted by name)."""
    items: list[StartItem] = []
    if data is not None:
        from data.indexed import ShardDataset

        ds = ShardDataset(data)
        for i in range(min(count, len(ds))):
            clip = ds[i]
            n = min(clip_frames, clip["video"].shape[0])
            meta = clip.get("meta") or {}
            label = f"clip {i}" + (f" · {meta['trajectory']}" if isinstance(meta.get("trajectory"), str) else "")
            items.append(StartItem(
                label=label, image=np.ascontiguousarray(clip["video"][0]),
                video=np.ascontiguousarray(clip["video"][:n]), c2w=np.asarray(clip["c2w"][:n], np.float64),
                K=np.asarray(clip["K"][:n], np.float64),
            ))
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise InferError(f"--images {folder}: not a directory")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: max(0, count)]:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None or min(bgr.shape[:2]) < MIN_SIDE:
                continue  # an unreadable file in the folder is skipped, not fatal
            items.append(StartItem(label=path.stem, image=np.ascontiguousarray(bgr[..., ::-1])))
    for item in items:
        item.thumbnail = _thumbnail(item.image, dst_hw)
    return items
