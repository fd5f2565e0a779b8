"""Import users' own pose-annotated videos into clip shards.

    python -m data.custom --videos DIR --poses DIR|FILE --out DIR [--pose-format FMT]
                          [--size WxH] [--fps N] [--clip-frames N] [--caption-file F]

Each video (any container PyAV decodes) needs camera poses for *every* decoded frame, in one of:

- ``per_frame_json``: WorldPlay's training pose JSON, one entry per frame (an object in frame
  order, or a list), each with ``w2c`` (4x4 world-to-camera) and ``intrinsic`` (3x3, pixels).
- ``worldplay_json``: WorldPlay's per-latent inference JSON (``data.poseio``): entry i is the c2w
  ``extrinsic`` and ``K`` of latent i, i.e. of frame ``stride * i``; the video must have
  ``1 + stride * (T - 1)`` frames and poses between latents are interpolated (slerp / lerp).
- ``csv``: one row per frame: ``frame``, the 16 entries of c2w (row-major), ``fx, fy, cx, cy``;
  an optional header row.
- ``colmap``: a directory with COLMAP's text model (``images.txt`` + ``cameras.txt``; world-to-
  camera quaternions). Image names carry the frame number (``frame_00012.png``); the registered
  images must cover every frame. Distortion (SIMPLE_RADIAL, RADIAL, OPENCV) is removed from
  the frames with ``cv2.undistort`` so that the stored K is a pinhole.

All cameras are OpenCV (x right, y down, z forward) and K is in pixels with pixel centres at
+0.5 (WorldPlay, COLMAP and data.geometry agree). Frames are framed to ``--size`` by
data.transforms' rule (largest centred window of that aspect, resized), with K updated;
``--fps`` keeps the nearest source frame at each output time (downsampling only). Poses are
rebased to each clip's first camera and keys are derived from them with WorldPlay's rule at
latent granularity (``data.actions.poses_to_keys``), since such sources lack keys. A video
without poses is rejected: it cannot be used for camera conditioning.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionThresholds, poses_to_keys
from data.geometry import invert_rigid, is_rigid, rebase_to_first, resize_intrinsics
from data.poseio import EntryKeyError, indexed_entries, load_json_strict, read_pose_json
from data.transforms import crop_box, crop_resize_frames, crop_resize_intrinsics, parse_wxh

__all__ = [
    "POSE_FORMATS",
    "VIDEO_SUFFIXES",
    "CustomImportError",
    "CustomImportConfig",
    "PoseTrack",
    "detect_pose_format",
    "read_poses",
    "frame_entries",
    "read_per_frame_json",
    "read_worldplay_json",
    "read_pose_csv",
    "read_colmap",
    "expand_latent_poses",
    "frame_keys_from_poses",
    "import_video",
    "import_videos",
    "main",
]

POSE_FORMATS = ("worldplay_json", "per_frame_json", "colmap", "csv")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
NO_POSES = "a video without camera poses cannot be used for camera conditioning"


class CustomImportError(ValueError):
    """Bad user input; the message names the file, the field and the problem."""

    def __init__(self, path: str | Path, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


@dataclass
class CustomImportConfig:
    """How user videos become clips."""

    pose_format: Optional[str] = None  # one of POSE_FORMATS; None: detect from the pose path
    width: Optional[int] = None  # output size; None keeps the source size
    height: Optional[int] = None
    fps: Optional[float] = None  # output frame rate (<= source); None keeps the source rate
    clip_frames: int = 0  # split each video into clips of this many frames (0: one clip per video)
    latent_stride: int = 4  # autoencoder temporal stride: keys are derived per group of this many frames
    translation_scale: float = 1.0  # multiplies pose translations (scene units per source unit)
    key_translation: float = 0.01  # WorldPlay's training-reader thresholds, per latent, after scaling
    key_rotation_deg: float = 0.05
    video_format: str = "mp4"  # shard video storage: mp4 (the source is lossy already) or lossless
    samples_per_shard: int = 64


@dataclass
class PoseTrack:
    """Per-frame (or per-latent) cameras read from a pose file."""

    c2w: Tensor  # float64 [N, 4, 4]
    K: Tensor  # float64 [N, 3, 3], pixels of an image of size image_size
    image_size: Optional[tuple[int, int]] = None  # (W, H) the K refers to; None: the video's size
    dist: Optional[Tensor] = None  # float64 [N, 4] OpenCV (k1, k2, p1, p2) distortion, or None
    per_latent: bool = False  # True: entry i is frame stride * i (worldplay_json)


# ----------------------------------------------------------------------------- pose readers


def _check_cameras(path: Path, c2w: Tensor, K: Tensor, pose_field: str, k_field: str, w2c: Optional[Tensor] = None) -> None:
    """Raise naming the first frame whose pose is not finite or not rigid, or whose K is not a pinhole."""
    given = c2w if w2c is None else w2c
    for i in range(given.shape[0]):
        if not bool(torch.isfinite(given[i]).all()):
            raise CustomImportError(path, f"frame {i} '{pose_field}'", "contains NaN or inf")
        if not bool(is_rigid(given[i])):
            raise CustomImportError(path, f"frame {i} '{pose_field}'",
                                    "is not a rigid transform (rotation must be orthonormal with det +1, last row 0 0 0 1)")
        if not bool(torch.isfinite(K[i]).all()):
            raise CustomImportError(path, f"frame {i} '{k_field}'", "contains NaN or inf")
        if K[i, 0, 0] <= 0 or K[i, 1, 1] <= 0 or not torch.allclose(K[i, 2], torch.tensor([0.0, 0.0, 1.0], dtype=K.dtype)):
            raise CustomImportError(path, f"frame {i} '{k_field}'", "must be a pinhole [[fx,0,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0")
        if looks_normalized(K[i]):
            fx, cx = float(K[i, 0, 0]), float(K[i, 0, 2])
            raise CustomImportError(path, f"frame {i} '{k_field}'", f"looks normalised (fx={fx:.3g}, cx={cx:.3g}); K must be "
                                    "in pixels of the source frames: multiply row 0 by the width and row 1 by the height")


def looks_normalized(K: Tensor) -> bool:
    """Whether a 3x3 K is in image-size units (fx, fy below 4 and a principal point in [0, 1.5]) rather than pixels.

    No real camera has a focal length of a few pixels with its principal point in the first pixel
    or two, so such a K is a normalised one passed where pixels are expected.
    """
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    return fx < 4 and fy < 4 and 0 <= cx <= 1.5 and 0 <= cy <= 1.5


def _matrix(path: Path, value: object, shape: tuple[int, int], field: str) -> Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise CustomImportError(path, field, f"not a numeric matrix ({e})") from None
    if tuple(t.shape) != shape:
        raise CustomImportError(path, field, f"has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _load_json(path: Path) -> object:
    """The JSON of ``path``; an object with a repeated key is an error naming the key."""
    try:
        return load_json_strict(path.read_text())
    except EntryKeyError as e:
        raise CustomImportError(path, f"key {e.key!r}", e.problem) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CustomImportError(path, "json", f"cannot be read ({e})") from None


def frame_entries(path: Path, raw: object, what: str = "per-frame entries") -> list:
    """Per-frame entries of a JSON list, or of an object keyed by frame number read by key (not file order)."""
    try:
        entries = indexed_entries(raw)
    except EntryKeyError as e:
        raise CustomImportError(path, f"key {e.key!r}", e.problem) from None
    except ValueError as e:
        raise CustomImportError(path, "json", f"expected a non-empty list or object of {what}: {e}") from None
    if not entries:
        raise CustomImportError(path, "json", f"expected a non-empty list or object of {what}")
    return entries


def read_per_frame_json(path: str | Path) -> PoseTrack:
    """WorldPlay's per-frame training JSON: entries (in frame order) with ``w2c`` and ``intrinsic``."""
    path = Path(path)
    entries = frame_entries(path, _load_json(path))
    w2c, K = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise CustomImportError(path, f"frame {i}", "entry is not an object with 'w2c' and 'intrinsic'")
        for key in ("w2c", "intrinsic"):
            if key not in e:
                raise CustomImportError(path, f"frame {i} '{key}'", "missing")
        w2c.append(_matrix(path, e["w2c"], (4, 4), f"frame {i} 'w2c'"))
        K.append(_matrix(path, e["intrinsic"], (3, 3), f"frame {i} 'intrinsic'"))
    w2c_t, K_t = torch.stack(w2c), torch.stack(K)
    _check_cameras(path, w2c_t, K_t, "w2c", "intrinsic", w2c=w2c_t)
    return PoseTrack(invert_rigid(w2c_t), K_t)


def read_worldplay_json(path: str | Path) -> PoseTrack:
    """WorldPlay's per-latent inference JSON (entry i = latent i): c2w ``extrinsic`` and ``K``."""
    path = Path(path)
    raw = _load_json(path)
    for i, entry in (raw.items() if isinstance(raw, dict) else ()):
        for key in ("extrinsic", "K"):
            value = entry.get(key) if isinstance(entry, dict) else None
            if value is not None and _numeric(value) and not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise CustomImportError(path, f"latent {i} '{key}'", "contains NaN or inf")
    try:
        c2w, K = read_pose_json(path)
    except ValueError as e:
        raise CustomImportError(path, "worldplay_json", str(e).removeprefix(f"{path}: ")) from None
    _check_cameras(path, c2w, K, "extrinsic", "K")
    return PoseTrack(c2w, K, per_latent=True)


def _numeric(value: object) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
        return True
    except (TypeError, ValueError):
        return False


def read_pose_csv(path: str | Path) -> PoseTrack:
    """CSV rows ``frame, c2w[0,0] .. c2w[3,3] (row-major), fx, fy, cx, cy``; an optional header row."""
    path = Path(path)
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CustomImportError(path, "csv", f"cannot be read ({e})") from None
    if rows and not _numeric([c.strip() for c in rows[0]]):
        rows = rows[1:]  # header
    if not rows:
        raise CustomImportError(path, "csv", "has no data rows")
    frames, values = [], []
    for n, r in enumerate(rows, start=1):
        if len(r) != 21:
            raise CustomImportError(path, f"row {n}", f"has {len(r)} columns, expected 21 (frame, 16 c2w values, fx, fy, cx, cy)")
        try:
            v = [float(c) for c in r]
        except ValueError:
            raise CustomImportError(path, f"row {n}", f"non-numeric value in {r}") from None
        if v[0] != int(v[0]):
            raise CustomImportError(path, f"row {n} 'frame'", f"frame index must be an integer, got {r[0]}")
        frames.append(int(v[0]))
        values.append(v[1:])
    order = np.argsort(frames, kind="stable")
    frames_sorted = [frames[i] for i in order]
    if frames_sorted != list(range(frames_sorted[0], frames_sorted[0] + len(frames))):
        raise CustomImportError(path, "frame", f"frame indices must be consecutive without repeats, got {frames_sorted[:10]}...")
    arr = torch.tensor([values[i] for i in order], dtype=torch.float64)
    c2w = arr[:, :16].reshape(-1, 4, 4)
    K = torch.zeros(len(arr), 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = arr[:, 16], arr[:, 17], arr[:, 18], arr[:, 19], 1.0
    _check_cameras(path, c2w, K, "c2w", "fx,fy,cx,cy")
    return PoseTrack(c2w, K)


# COLMAP camera models we accept: name -> (fx, fy, cx, cy, k1, k2, p1, p2) from its params.
_COLMAP_MODELS = {
    "SIMPLE_PINHOLE": lambda p: (p[0], p[0], p[1], p[2], 0, 0, 0, 0),
    "PINHOLE": lambda p: (p[0], p[1], p[2], p[3], 0, 0, 0, 0),
    "SIMPLE_RADIAL": lambda p: (p[0], p[0], p[1], p[2], p[3], 0, 0, 0),
    "RADIAL": lambda p: (p[0], p[0], p[1], p[2], p[3], p[4], 0, 0),
    "OPENCV": lambda p: tuple(p[:8]),
}
_COLMAP_NPARAMS = {"SIMPLE_PINHOLE": 3, "PINHOLE": 4, "SIMPLE_RADIAL": 4, "RADIAL": 5, "OPENCV": 8}


def _quat_to_rotmat(q: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] of unit quaternions [..., 4] in (w, x, y, z) order (COLMAP's)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def _rotmat_to_quat(R: Tensor) -> Tensor:
    """Unit quaternions [..., 4] (w, x, y, z) with w >= 0 of rotation matrices [..., 3, 3]."""
    m = R
    w = torch.sqrt((1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]).clamp_min(0)) / 2
    x = torch.sqrt((1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    y = torch.sqrt((1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    z = torch.sqrt((1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]).clamp_min(0)) / 2
    x = torch.copysign(x, m[..., 2, 1] - m[..., 1, 2])
    y = torch.copysign(y, m[..., 0, 2] - m[..., 2, 0])
    z = torch.copysign(z, m[..., 1, 0] - m[..., 0, 1])
    q = torch.stack([w, x, y, z], dim=-1)
    return q / q.norm(dim=-1, keepdim=True)


def _colmap_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CustomImportError(path, "colmap", "missing (a COLMAP text model needs images.txt and cameras.txt)")
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def read_colmap(path: str | Path) -> PoseTrack:
    """A COLMAP text model directory; frames ordered by the number in each image name."""
    root = Path(path)
    cams: dict[int, tuple[int, int, tuple[float, ...]]] = {}
    cam_file = root / "cameras.txt"
    for n, line in enumerate(_colmap_lines(cam_file), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) < 4 or tok[1] not in _COLMAP_MODELS:
            model = tok[1] if len(tok) > 1 else line
            raise CustomImportError(cam_file, f"line {n}", f"unsupported camera {model!r}; supported models: {sorted(_COLMAP_MODELS)}")
        try:
            params = [float(v) for v in tok[4:]]
            cam_id, width, height = int(tok[0]), int(tok[2]), int(tok[3])
        except ValueError:
            raise CustomImportError(cam_file, f"line {n}", f"expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {line!r}") from None
        if len(params) != _COLMAP_NPARAMS[tok[1]]:
            raise CustomImportError(cam_file, f"line {n}", f"{tok[1]} needs {_COLMAP_NPARAMS[tok[1]]} parameters, got {len(params)}")
        cams[cam_id] = (width, height, tuple(float(v) for v in _COLMAP_MODELS[tok[1]](params)))
    img_file = root / "images.txt"
    lines = _colmap_lines(img_file)
    images = []  # (frame number or None, name, qvec, tvec, camera id)
    i = 0
    while i < len(lines):
        tok = lines[i].split()
        if not tok:
            i += 1
            continue
        if len(tok) < 10:
            raise CustomImportError(img_file, f"image line {i + 1}",
                                    f"expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {lines[i]!r}")
        name = " ".join(tok[9:])
        try:
            cam, qvec, tvec = int(tok[8]), [float(v) for v in tok[1:5]], [float(v) for v in tok[5:8]]
        except ValueError:
            raise CustomImportError(img_file, f"image {name!r}", f"non-numeric pose in {lines[i]!r}") from None
        if cam not in cams:
            raise CustomImportError(img_file, f"image {name!r}", f"camera {cam} is not in cameras.txt")
        nums = re.findall(r"\d+", Path(name).stem)
        images.append((int(nums[-1]) if nums else None, name, qvec, tvec, cam))
        i += 2  # the next line lists the image's 2D points (possibly empty)
    if not images:
        raise CustomImportError(img_file, "images", "no registered images")
    if all(f is not None for f, *_ in images):
        images.sort(key=lambda im: im[0])
        numbers = [im[0] for im in images]
        expected = list(range(numbers[0], numbers[0] + len(numbers)))
        if numbers != expected:
            missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
            raise CustomImportError(img_file, "images", f"frames must be registered without gaps; "
                                    f"missing frame numbers {missing[:20]} (or repeated numbers)")
    else:
        images.sort(key=lambda im: im[1])
    q = torch.tensor([im[2] for im in images], dtype=torch.float64)
    t = torch.tensor([im[3] for im in images], dtype=torch.float64)
    if not bool(torch.isfinite(q).all() and torch.isfinite(t).all()):
        bad = int((~(torch.isfinite(q).all(-1) & torch.isfinite(t).all(-1))).nonzero()[0])
        raise CustomImportError(img_file, f"image {images[bad][1]!r} 'qvec/tvec'", "contains NaN or inf")
    norms = q.norm(dim=-1)
    if bool(((norms - 1).abs() > 1e-3).any()):
        bad = int(((norms - 1).abs() > 1e-3).nonzero()[0])
        raise CustomImportError(img_file, f"image {images[bad][1]!r} 'qvec'", f"is not a unit quaternion (norm {norms[bad]:.4f})")
    w2c = torch.zeros(len(images), 4, 4, dtype=torch.float64)
    w2c[:, :3, :3], w2c[:, :3, 3], w2c[:, 3, 3] = _quat_to_rotmat(q), t, 1.0
    sizes = {cams[im[4]][:2] for im in images}
    if len(sizes) != 1:
        raise CustomImportError(cam_file, "WIDTH HEIGHT", f"all frames of a video must share one image size, got {sorted(sizes)}")
    p = torch.tensor([cams[im[4]][2] for im in images], dtype=torch.float64)
    K = torch.zeros(len(images), 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = p[:, 0], p[:, 1], p[:, 2], p[:, 3], 1.0
    dist = p[:, 4:8] if bool((p[:, 4:8] != 0).any()) else None
    _check_cameras(img_file, invert_rigid(w2c), K, "qvec/tvec", "camera", w2c=w2c)
    return PoseTrack(invert_rigid(w2c), K, image_size=sizes.pop(), dist=dist)


def _colmap_dir(path: Path) -> Optional[Path]:
    """The directory holding images.txt: ``path`` itself, ``path/sparse/0`` or ``path/sparse``."""
    for d in (path, path / "sparse" / "0", path / "sparse"):
        if (d / "images.txt").is_file():
            return d
    return None


def detect_pose_format(path: str | Path) -> str:
    """Guess the format of a pose file or directory (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if _colmap_dir(path) is not None:
            return "colmap"
        raise CustomImportError(path, "pose format", "a directory without a COLMAP images.txt; pass --pose-format")
    if path.suffix.lower() == ".csv":
        return "csv"
    if path.suffix.lower() == ".json":
        raw = _load_json(path)
        try:
            entries = indexed_entries(raw) if isinstance(raw, (dict, list)) else []
        except EntryKeyError as e:
            raise CustomImportError(path, f"key {e.key!r}", e.problem) from None
        first = entries[0] if entries else None
        if isinstance(first, dict) and "w2c" in first:
            return "per_frame_json"
        if isinstance(first, dict) and "extrinsic" in first:
            return "worldplay_json"
    raise CustomImportError(path, "pose format", f"cannot tell the format; pass --pose-format (one of {POSE_FORMATS})")


def read_poses(path: str | Path, fmt: Optional[str] = None) -> PoseTrack:
    """Read a pose file/directory in ``fmt`` (detected when None)."""
    path = Path(path)
    if not path.exists():
        raise CustomImportError(path, "poses", f"not found; {NO_POSES}")
    fmt = fmt or detect_pose_format(path)
    if fmt == "colmap":
        return read_colmap(_colmap_dir(path) or path)  # without images.txt: raises naming it
    readers = {"per_frame_json": read_per_frame_json, "worldplay_json": read_worldplay_json, "csv": read_pose_csv}
    if fmt not in readers:
        raise CustomImportError(path, "pose format", f"unknown format {fmt!r}; one of {POSE_FORMATS}")
    return readers[fmt](path)


# ----------------------------------------------------------------------------- poses -> frames


def _slerp(q0: Tensor, q1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of unit quaternions [4] at fractions t [N] -> [N, 4]."""
    dot = float((q0 * q1).sum())
    if dot < 0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + t[:, None] * (q1 - q0)
    else:
        theta = math.acos(min(dot, 1.0))
        q = (torch.sin((1 - t) * theta)[:, None] * q0 + torch.sin(t * theta)[:, None] * q1) / math.sin(theta)
    return q / q.norm(dim=-1, keepdim=True)


def expand_latent_poses(track: PoseTrack, num_frames: int, stride: int, where: str | Path) -> PoseTrack:
    """Per-frame cameras from per-latent ones (latent i = frame stride*i): slerp rotations, lerp the rest."""
    T = track.c2w.shape[0]
    if num_frames != 1 + stride * (T - 1):
        raise CustomImportError(where, "frames", f"the pose file has {T} latents, which cover 1 + {stride}*{T - 1} = "
                                f"{1 + stride * (T - 1)} frames, but the video has {num_frames} frames")
    q = _rotmat_to_quat(track.c2w[:, :3, :3])
    c2w = torch.zeros(num_frames, 4, 4, dtype=torch.float64)
    K = torch.zeros(num_frames, 3, 3, dtype=torch.float64)
    c2w[0], K[0] = track.c2w[0], track.K[0]
    frac = torch.arange(1, stride + 1, dtype=torch.float64) / stride
    for i in range(1, T):
        sl = slice(1 + stride * (i - 1), 1 + stride * i)
        c2w[sl, :3, :3] = _quat_to_rotmat(_slerp(q[i - 1], q[i], frac))
        c2w[sl, :3, 3] = torch.lerp(track.c2w[i - 1, :3, 3].expand(stride, 3), track.c2w[i, :3, 3].expand(stride, 3), frac[:, None])
        c2w[sl, 3, 3] = 1.0
        K[sl] = torch.lerp(track.K[i - 1].expand(stride, 3, 3), track.K[i].expand(stride, 3, 3), frac[:, None, None])
    c2w[stride * torch.arange(T)] = track.c2w  # exact at the latent frames
    return PoseTrack(c2w, K, track.image_size, None, per_latent=False)


def frame_keys_from_poses(c2w: Tensor, stride: int, thresholds: MotionThresholds) -> Tensor:
    """Held keys bool [F, 8] for poses c2w [F, 4, 4]: WorldPlay's rule per latent, held by its frames.

    Latent groups are frame 0, then frames (s(i-1), s*i]; a group's motion is from its first
    frame's predecessor to its last frame (a shorter final group uses its last frame), and every
    frame of the group holds the keys of that motion, so ``latent_keys_from_frames`` gives back
    exactly the per-latent keys. Frame 0 holds nothing.
    """
    F = c2w.shape[0]
    ends = list(range(0, F, stride)) + ([F - 1] if (F - 1) % stride else [])
    latent_keys = poses_to_keys(c2w[ends], thresholds)
    keys = torch.zeros(F, NUM_KEYS, dtype=torch.bool)
    for j in range(1, len(ends)):
        keys[ends[j - 1] + 1 : ends[j] + 1] = latent_keys[j]
    return keys


# ----------------------------------------------------------------------------- video


def _video_rate(stream) -> Optional[Fraction]:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else None


def _to_video_k(track: PoseTrack, video_wh: tuple[int, int], where: Path) -> Tensor:
    """The track's K at the video's resolution (COLMAP may have run on resized images)."""
    if track.image_size is None or track.image_size == video_wh:
        return track.K
    (w, h), (W, H) = track.image_size, video_wh
    if abs(w / h - W / H) > 0.01:
        raise CustomImportError(where, "image size", f"the cameras are for {w}x{h} images, the video is {W}x{H}: aspect ratios differ")
    return resize_intrinsics(track.K, (h, w), (H, W))


def _decode(path: Path, pose_path: Path, track: PoseTrack, cfg: CustomImportConfig):
    """Decode, undistort, resample in time, resize and crop a video in one pass.

    Returns (frames uint8 [N, H, W, 3], source frame indices [N], output fps, source (W, H),
    per-frame track, K [N, 3, 3] of the output frames). Raises if frame and pose counts differ.
    """
    import av
    import cv2

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise CustomImportError(path, "video", f"cannot be opened ({e})") from None
    out, picked = [], []
    n, next_pick, plan, src_wh, out_hw, undistort_k = 0, 0.0, None, (0, 0), (0, 0), None
    with container:
        if not container.streams.video:
            raise CustomImportError(path, "video", "has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _video_rate(stream)
        if cfg.fps is not None and (rate is None or cfg.fps > float(rate) + 1e-6):
            have = float(rate) if rate else "none"
            raise CustomImportError(path, "fps", f"--fps {cfg.fps} needs a source rate at least as high, the video has {have}")
        step = float(rate) / cfg.fps if cfg.fps else 1.0
        try:
            for frame in container.decode(stream):
                if n >= round(next_pick):
                    img = frame.to_ndarray(format="rgb24")
                    if plan is None:
                        src_wh = (img.shape[1], img.shape[0])
                        out_hw = (cfg.height or src_wh[1], cfg.width or src_wh[0])
                        plan = crop_box((src_wh[1], src_wh[0]), out_hw)  # data.transforms: the one framing rule
                        if track.dist is not None:
                            undistort_k = _to_video_k(track, src_wh, pose_path).numpy()
                    if (img.shape[1], img.shape[0]) != src_wh:
                        raise CustomImportError(path, f"frame {n}", f"size changed from {src_wh} to {img.shape[1::-1]}")
                    if undistort_k is not None and n < len(undistort_k):
                        img = cv2.undistort(img, undistort_k[n], track.dist[n].numpy())
                    out.append(crop_resize_frames(img, plan, out_hw))
                    picked.append(n)
                    next_pick += step
                n += 1
        except av.FFmpegError as e:
            raise CustomImportError(path, f"frame {n}", f"cannot be decoded ({e})") from None
    if n == 0 or plan is None:
        raise CustomImportError(path, "video", "has no frames")
    if track.per_latent:
        track = expand_latent_poses(track, n, cfg.latent_stride, pose_path)
    if track.c2w.shape[0] != n:
        raise CustomImportError(pose_path, "frames", f"has {track.c2w.shape[0]} poses but the video {path.name} has {n} frames "
                                "(one pose per frame needed)")
    K = crop_resize_intrinsics(_to_video_k(track, src_wh, pose_path)[picked], plan, out_hw)
    out_fps = cfg.fps or (float(rate) if rate else 30.0)
    return np.stack(out), picked, out_fps, src_wh, track, K


# ----------------------------------------------------------------------------- clips


def import_video(video: str | Path, poses: str | Path, cfg: CustomImportConfig = CustomImportConfig(), caption: str = "") -> list[dict]:
    """Clips (the contract's dicts) from one video and its pose file, validated."""
    from data.contract import validate_clip

    video, poses = Path(video), Path(poses)
    if (cfg.width is None) != (cfg.height is None):
        raise CustomImportError(video, "size", "give both width and height, or neither")
    if not poses.exists():
        raise CustomImportError(poses, "poses", f"not found; {NO_POSES}")
    fmt = cfg.pose_format or detect_pose_format(poses)
    track = read_poses(poses, fmt)
    frames, picked, fps, src_wh, track, K = _decode(video, poses, track, cfg)
    c2w_all = track.c2w[picked].clone()
    c2w_all[:, :3, 3] *= cfg.translation_scale
    thresholds = MotionThresholds(translation=cfg.key_translation, rotation_deg=cfg.key_rotation_deg)
    L = cfg.clip_frames or len(frames)
    clips = []
    for j, start in enumerate(range(0, len(frames), L)):
        stop = min(start + L, len(frames))
        if stop - start < 2 or (start > 0 and stop - start < 1 + cfg.latent_stride):
            break  # a short tail: too short for one latent step
        c2w = rebase_to_first(c2w_all[start:stop])
        clip = {
            "video": frames[start:stop],
            "c2w": c2w.float().numpy(),
            "K": K[start:stop].float().numpy(),
            "keys": frame_keys_from_poses(c2w, cfg.latent_stride, thresholds).numpy(),
            "caption": caption,
            "meta": {
                "source": "custom",
                "scene": video.stem,
                "video": video.name,
                "pose_file": poses.name,
                "pose_format": fmt,
                "fps": fps,
                "source_size": list(src_wh),
                "source_frames": [picked[start], picked[stop - 1]],
                "clip": j,
                "keys": f"derived from poses per {cfg.latent_stride}-frame latent (WorldPlay rule)",
                "translation_scale": cfg.translation_scale,
            },
        }
        validate_clip(clip, f"{video} clip {j}")
        clips.append(clip)
    return clips


def _find_pose(video: Path, poses: Path) -> Path:
    """The pose file/directory of ``video`` inside the ``poses`` directory."""
    for cand in (poses / f"{video.stem}.json", poses / f"{video.stem}.csv", poses / video.stem):
        if cand.exists():
            return cand
    raise CustomImportError(video, "poses", f"no pose file {video.stem}.json / {video.stem}.csv / {video.stem}/ in {poses}: {NO_POSES}")


def _read_captions(path: Optional[Path]) -> dict[str, str]:
    """Captions by video stem: a JSON object, or lines ``stem<TAB>caption``."""
    if path is None:
        return {}
    if path.suffix.lower() == ".json":
        raw = _load_json(path)
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise CustomImportError(path, "captions", "expected a JSON object {video stem: caption}")
        return {Path(k).stem: v for k, v in raw.items()}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            if "\t" not in line:
                raise CustomImportError(path, f"line {n}", "expected 'video_stem<TAB>caption'")
            k, v = line.split("\t", 1)
            out[Path(k.strip()).stem] = v.strip()
    return out


def import_videos(videos: str | Path, poses: str | Path, out: str | Path, cfg: CustomImportConfig = CustomImportConfig(),
                  caption_file: Optional[str | Path] = None, overwrite: bool = False) -> dict:
    """Import every video of a directory (or one video file) into shards under ``out``; returns a summary.

    ``poses`` is a directory holding ``<stem>.json`` / ``<stem>.csv`` / ``<stem>/`` (COLMAP) per
    video, or one pose file/directory when there is one video. Every pose file is found, read and
    checked before any video is decoded. Shards are staged in a hidden sibling of ``out`` and moved
    into it only when every video imported: a problem found while decoding (a frame count, a
    broken video) leaves ``out`` as it was. The mp4 time base uses ``cfg.fps`` (16
    when None); each clip's true rate is in ``meta['fps']``.
    """
    from data.shards import ShardWriter

    videos, poses = Path(videos), Path(poses)
    if videos.is_dir():
        files = sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    elif videos.is_file():
        files = [videos]
    else:
        raise CustomImportError(videos, "videos", "not found")
    if not files:
        raise CustomImportError(videos, "videos", f"no video files ({', '.join(VIDEO_SUFFIXES)})")
    if poses.is_dir() and not (len(files) == 1 and _colmap_dir(poses) is not None):
        pairs = [(v, _find_pose(v, poses)) for v in files]
    elif len(files) == 1:
        pairs = [(files[0], poses)]
    else:
        raise CustomImportError(poses, "poses", f"one pose file for {len(files)} videos: pass a directory with one pose file per video")
    captions = _read_captions(Path(caption_file) if caption_file else None)
    for _, pose in pairs:
        read_poses(pose, cfg.pose_format)
    n_clips = n_frames = 0
    with ShardWriter(out, prefix="custom", samples_per_shard=cfg.samples_per_shard, video_format=cfg.video_format,
                     fps=cfg.fps or 16.0, overwrite=overwrite, staged=True) as writer:
        for video, pose in pairs:
            for clip in import_video(video, pose, cfg, captions.get(video.stem, "")):
                writer.write(clip)
                n_clips += 1
                n_frames += len(clip["video"])
            print(f"{video.name}: {n_clips} clips so far", file=sys.stderr, flush=True)
    return {"videos": len(pairs), "clips": n_clips, "frames": n_frames, "out": str(out)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.custom", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="a video file or a directory of videos")
    p.add_argument("--poses", required=True, help="a directory with one pose file per video (same stem), or one pose file")
    p.add_argument("--out", required=True)
    p.add_argument("--pose-format", choices=POSE_FORMATS, default=None, help="default: detected from the files")
    p.add_argument("--size", default=None, help="output WxH (cover + centre crop); default: source size")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (<= source)")
    p.add_argument("--clip-frames", type=int, default=0, help="split videos into clips of this many frames (0: whole video)")
    p.add_argument("--latent-stride", type=int, default=4)
    p.add_argument("--translation-scale", type=float, default=1.0, help="scene units per pose unit")
    p.add_argument("--caption-file", default=None, help="JSON {stem: caption} or lines 'stem<TAB>caption'")
    p.add_argument("--video-format", choices=("mp4", "lossless"), default="mp4")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    width = height = None
    if args.size:
        try:
            width, height = parse_wxh(args.size)
        except ValueError as e:
            p.error(str(e))
    cfg = CustomImportConfig(pose_format=args.pose_format, width=width, height=height, fps=args.fps,
                             clip_frames=args.clip_frames, latent_stride=args.latent_stride,
                             translation_scale=args.translation_scale, video_format=args.video_format)
    try:
        summary = import_videos(args.videos, args.poses, args.out, cfg, args.caption_file, args.overwrite)
    except (CustomImportError, FileExistsError, NotADirectoryError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
