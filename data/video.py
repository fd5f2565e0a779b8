"""Video files: H.264 MP4 through PyAV (in memory or on disk) and PNG preview strips.

Frames are always uint8 RGB arrays ``[F, H, W, 3]``. MP4s are H.264, yuv420p, tagged BT.601
limited range (the conversion swscale applies to RGB input), so any player decodes the colours we
encoded. yuv420p needs even sizes: an odd height or width is padded by repeating the last row /
column, the true size is recorded in the container's ``comment`` tag, and :func:`read_mp4` crops
the padding away again, so a round trip keeps the shape.
"""

from __future__ import annotations

import io
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

__all__ = ["VideoError", "write_mp4", "read_mp4", "encode_mp4_bytes", "decode_mp4_bytes", "write_png_strip"]

_SIZE_TAG = "worldsmith-size={w}x{h}"
_SIZE_RE = re.compile(r"worldsmith-size=(\d+)x(\d+)")
# x264 VUI flags matching swscale's default RGB -> YUV matrix (BT.601, limited range).
# Below this many pixels per frame, decoder threads cost more than they save (measured at 64x64:
# ~1800 frames/s on one thread against ~400-1000 with automatic threading).
_THREADED_DECODE_PIXELS = 256 * 256
_X264_VUI = "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m:range=tv"


class VideoError(ValueError):
    """Frames that cannot be encoded, or bytes/files that cannot be decoded; names ``where``."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def _check_frames(frames: np.ndarray, where: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(where, f"expected frames uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise VideoError(where, f"frames must be non-empty, got shape {list(frames.shape)}")
    return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Edge-replicate one row / column where H or W is odd (yuv420p needs even sizes)."""
    H, W = frames.shape[1:3]
    if H % 2 == 0 and W % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")


def _encode(target: str | io.BytesIO, frames: np.ndarray, fps: float, crf: int, preset: str, where: str) -> None:
    if not (fps > 0 and np.isfinite(fps)):
        raise VideoError(where, f"fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
        raise VideoError(where, f"crf must be in [0, 51] for H.264, got {crf}")
    F, H, W = frames.shape[:3]
    padded = _pad_even(frames)
    try:
        with av.open(target, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = padded.shape[2], padded.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(int(crf)), "preset": preset, "x264-params": _X264_VUI}
            if padded.shape[1:3] != (H, W):
                container.metadata["comment"] = _SIZE_TAG.format(w=W, h=H)
            for frame in padded:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed (B-)frames
                container.mux(packet)
    except av.FFmpegError as exc:
        raise VideoError(where, f"H.264 encoding failed: {exc}") from exc


def encode_mp4_bytes(frames: np.ndarray, fps: float = 16.0, crf: int = 18, *, preset: str = "veryfast") -> bytes:
    """Encode frames uint8 [F, H, W, 3] to an in-memory H.264 MP4 (for shards)."""
    frames = _check_frames(frames, "encode_mp4_bytes")
    buf = io.BytesIO()
    _encode(buf, frames, fps, crf, preset, "encode_mp4_bytes")
    return buf.getvalue()


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: float = 16.0, crf: int = 18, *, preset: str = "veryfast"
) -> None:
    """Write frames uint8 [F, H, W, 3] to ``path`` as H.264 MP4 (parent directories are created)."""
    frames = _check_frames(frames, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _encode(str(path), frames, fps, crf, preset, str(path))


def _decode(source: str | io.BytesIO, where: str, max_frames: int | None = None) -> np.ndarray:
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise VideoError(where, "no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx.width * ctx.height >= _THREADED_DECODE_PIXELS:
                stream.thread_type = "AUTO"
            else:
                ctx.thread_count = 1
            frames = []
            for f in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    raise VideoError(where, f"more than {max_frames} frames (the limit here); trim the video")
                frames.append(f.to_ndarray(format="rgb24"))
            size = _SIZE_RE.search(str(container.metadata.get("comment", "")))
    except (av.FFmpegError, EOFError) as exc:
        raise VideoError(where, f"cannot decode video: {exc}") from exc
    if not frames:
        raise VideoError(where, "video has no frames")
    video = np.stack(frames)
    if size is not None:
        w, h = int(size.group(1)), int(size.group(2))
        video = np.ascontiguousarray(video[:, :h, :w])
    return video


def decode_mp4_bytes(data: bytes, where: str = "<mp4 bytes>", *, max_frames: int | None = None) -> np.ndarray:
    """Decode an in-memory MP4 to frames uint8 [F, H, W, 3]; raises VideoError naming ``where``
    (also when it holds more than ``max_frames`` frames: untrusted uploads)."""
    return _decode(io.BytesIO(data), where, max_frames)


def read_mp4(path_or_bytes: str | os.PathLike | bytes) -> np.ndarray:
    """Read a video file (or its bytes) to frames uint8 [F, H, W, 3]."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return decode_mp4_bytes(bytes(path_or_bytes))
    path = Path(path_or_bytes)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    return _decode(str(path), str(path))


def write_png_strip(path: str | os.PathLike, frames: np.ndarray, num: int = 8) -> None:
    """Save ``num`` evenly spaced frames side by side as one PNG [H, n*W, 3] (n = min(num, F)), for previews."""
    frames = _check_frames(frames, str(path))
    if num < 1:
        raise VideoError(str(path), f"num must be >= 1, got {num}")
    n = min(num, frames.shape[0])
    idx = np.linspace(0, frames.shape[0] - 1, n).round().astype(int)
    strip = np.concatenate(list(frames[idx]), axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
        raise VideoError(str(path), "cv2.imwrite failed (is the extension .png and the directory writable?)")
