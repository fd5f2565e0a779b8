"""Import a folder of pose-annotated videos (mp4 files or image folders) into clip shards.

    python -m data.import_folder --src DIR --out DIR [--fps N] [--size WxH] [--normalize-scale]
                                 [--target-step S] [--image-fps N] [--clip-frames N] [--overwrite]

``DIR`` holds videos matched to their files by stem:

- a video: ``clip01.mp4`` (any suffix of ``data.custom.VIDEO_SUFFIXES``), or a folder
  ``clip01/`` of images (png/jpg/jpeg/bmp/webp) whose names carry the frame number
  (``00000.png``, ``frame_12.jpg``; ordered by that number);
- poses, one entry per frame (required): ``clip01.json`` or ``clip01.poses.json``, either
  WorldPlay's training format (a list, or an object in frame order, of ``{"w2c": 4x4,
  "intrinsic": 3x3 pixels}``; ``data.custom.read_per_frame_json``) or ours: the same layout with
  ``{"c2w": 4x4, "K": 3x3 pixels}`` (OpenCV camera, K of the source frames);
- actions, one entry per frame (optional): ``clip01.actions.json``, WorldPlay's game format,
  ``{"move_action": "WA", "view_action": "LR"}`` per frame (``move_action`` any of W/A/S/D,
  ``view_action`` one of LR/LL/LU/LD or empty). Entry i is stored as the keys held from frame
  i-1 to frame i: W/S/D/A, LR = yaw-right, LL = yaw-left, LU = pitch-up, LD = pitch-down.
  Without it, keys are derived from the poses per latent (``data.custom.frame_keys_from_poses``).

Poses are rebased to each clip's first camera. ``--normalize-scale`` multiplies translations so
that the median camera step between consecutive output frames (over the frames that move)
equals ``--target-step`` scene units (default 0.02: WorldPlay's 0.08 units per 4-frame latent);
the factor goes to ``meta["scale_normalization"]`` and is printed. Decoding, framing, pose
readers and checks are ``data.custom``'s; this module only finds the files and adds image
folders, our pose format, recorded actions and scale normalisation.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from data.actions import KEY_NAMES, NUM_KEYS, MotionThresholds
from data.custom import (
    VIDEO_SUFFIXES,
    CustomImportConfig,
    CustomImportError,
    PoseTrack,
    _check_cameras,
    _decode,
    _load_json,
    _matrix,
    _to_video_k,
    frame_entries,
    frame_keys_from_poses,
    read_per_frame_json,
)
from data.geometry import rebase_to_first
from data.transforms import crop_box, crop_resize_frames, crop_resize_intrinsics, parse_wxh

__all__ = ["IMAGE_SUFFIXES", "FolderImportConfig", "FolderItem", "find_items", "image_frames", "read_frame_poses", "read_actions",
           "scale_factor", "import_item", "import_folder", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MOVE_KEYS = {"W": 0, "S": 1, "D": 2, "A": 3}
VIEW_KEYS = {"LR": 4, "LL": 5, "LU": 6, "LD": 7}


@dataclass
class FolderImportConfig:
    """How a folder of videos becomes clips (framing and rates as in data.custom)."""

    width: Optional[int] = None  # output size; None keeps the source size
    height: Optional[int] = None
    fps: Optional[float] = None  # output frame rate (<= source); None keeps the source rate
    image_fps: float = 16.0  # frame rate of image-folder videos
    clip_frames: int = 0  # split each video into clips of this many frames (0: one clip per video)
    latent_stride: int = 4  # keys derived from poses per group of this many frames
    normalize_scale: bool = False
    target_step: float = 0.02  # scene units per output frame after --normalize-scale
    key_translation: float = 0.01  # WorldPlay's pose -> key thresholds per latent (after scaling)
    key_rotation_deg: float = 0.05
    video_format: str = "mp4"
    samples_per_shard: int = 64


@dataclass
class FolderItem:
    """One video of the folder and its files."""

    name: str
    video: Path  # an mp4 file or a folder of images
    poses: Path
    actions: Optional[Path] = None


# ----------------------------------------------------------------------------- files


def _frame_number(p: Path) -> tuple[int, str]:
    nums = re.findall(r"\d+", p.stem)
    return (int(nums[-1]) if nums else -1, p.name)


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_frame_number)


def image_frames(folder: Path) -> list[Path]:
    """The images of an image-folder video in frame order; every name must carry a frame number, with no gaps or repeats.

    Checked like COLMAP input: a missing frame would otherwise import silently as a jump in time.
    """
    files = _images(folder)
    unnumbered = [p.name for p in files if _frame_number(p)[0] < 0]
    if unnumbered:
        raise CustomImportError(folder / unnumbered[0], "frame number", "the image name carries no frame number "
                                "(name images like 00000.png or frame_12.jpg)")
    numbers = [_frame_number(p)[0] for p in files]
    repeats = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeats:
        names = [p.name for p in files if _frame_number(p)[0] == repeats[0]]
        raise CustomImportError(folder, "frames", f"frame number {repeats[0]} appears more than once ({', '.join(names)})")
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)) if numbers else []
    if missing:
        raise CustomImportError(folder, "frames", f"images must be numbered without gaps; missing frame numbers {missing[:20]}")
    return files


def find_items(src: str | Path) -> list[FolderItem]:
    """Every video of ``src`` with its pose file (required) and action file (optional)."""
    src = Path(src)
    if not src.is_dir():
        raise CustomImportError(src, "src", "not a directory")
    items = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            name = p.stem
        elif p.is_dir() and _images(p):
            name = p.name
        else:
            continue
        poses = next((c for c in (src / f"{name}.json", src / f"{name}.poses.json") if c.is_file()), None)
        if poses is None:
            raise CustomImportError(p, "poses", f"no {name}.json or {name}.poses.json next to it: "
                                    "a video without camera poses cannot be used for camera conditioning")
        actions = src / f"{name}.actions.json"
        items.append(FolderItem(name, p, poses, actions if actions.is_file() else None))
    if not items:
        raise CustomImportError(src, "src", f"no videos ({', '.join(VIDEO_SUFFIXES)}) or image folders ({', '.join(IMAGE_SUFFIXES)})")
    return items


def read_frame_poses(path: str | Path) -> PoseTrack:
    """Per-frame poses: WorldPlay's ``{w2c, intrinsic}`` entries or our ``{c2w, K}`` ones."""
    path = Path(path)
    entries = frame_entries(path, _load_json(path))
    if not isinstance(entries[0], dict):
        raise CustomImportError(path, "frame 0", "is not an object with 'w2c'/'intrinsic' (WorldPlay) or 'c2w'/'K' (ours)")
    if "w2c" in entries[0]:
        return read_per_frame_json(path)
    if "c2w" not in entries[0]:
        raise CustomImportError(path, "frame 0", "has neither 'w2c'/'intrinsic' (WorldPlay) nor 'c2w'/'K' (ours)")
    c2w, K = [], []
    for i, e in enumerate(entries):
        for key in ("c2w", "K"):
            if not isinstance(e, dict) or key not in e:
                raise CustomImportError(path, f"frame {i} '{key}'", "missing")
        c2w.append(_matrix(path, e["c2w"], (4, 4), f"frame {i} 'c2w'"))
        K.append(_matrix(path, e["K"], (3, 3), f"frame {i} 'K'"))
    c2w_t, K_t = torch.stack(c2w), torch.stack(K)
    _check_cameras(path, c2w_t, K_t, "c2w", "K")
    return PoseTrack(c2w_t, K_t)


def read_actions(path: str | Path) -> Tensor:
    """Held keys bool [F, 8] from WorldPlay's per-frame action JSON (``move_action``, ``view_action``)."""
    path = Path(path)
    entries = frame_entries(path, _load_json(path), "per-frame actions")
    keys = torch.zeros(len(entries), NUM_KEYS, dtype=torch.bool)
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise CustomImportError(path, f"frame {i}", "entry is not an object with 'move_action' / 'view_action'")
        move, view = e.get("move_action") or "", e.get("view_action") or ""
        if not isinstance(move, str) or any(c not in MOVE_KEYS for c in move.upper()):
            raise CustomImportError(path, f"frame {i} 'move_action'", f"must be a string of W/A/S/D, got {move!r}")
        if not isinstance(view, str) or (view and view.upper() not in VIEW_KEYS):
            raise CustomImportError(path, f"frame {i} 'view_action'", f"must be one of {sorted(VIEW_KEYS)} or empty, got {view!r}")
        for c in move.upper():
            keys[i, MOVE_KEYS[c]] = True
        if view:
            keys[i, VIEW_KEYS[view.upper()]] = True
    return keys


# ----------------------------------------------------------------------------- frames


def _read_image_folder(item: FolderItem, track: PoseTrack, cfg: FolderImportConfig, custom: CustomImportConfig):
    """Like data.custom's decoder for a folder of images: (frames, picked, fps, source (W, H), track, K)."""
    import cv2

    files = image_frames(item.video)
    if track.c2w.shape[0] != len(files):
        raise CustomImportError(item.poses, "frames", f"has {track.c2w.shape[0]} poses but the image folder {item.video.name} "
                                f"has {len(files)} frames (one pose per frame needed)")
    if cfg.fps is not None and cfg.fps > cfg.image_fps + 1e-6:
        raise CustomImportError(item.video, "fps", f"--fps {cfg.fps} needs a source rate at least as high, --image-fps is {cfg.image_fps}")
    step = cfg.image_fps / cfg.fps if cfg.fps else 1.0
    picked = sorted({round(k * step) for k in range(int(len(files) / step) + 1)} & set(range(len(files))))
    out, plan, src_wh = [], None, (0, 0)
    out_hw = (0, 0)
    for n in picked:
        img = cv2.imread(str(files[n]), cv2.IMREAD_COLOR)
        if img is None:
            raise CustomImportError(files[n], f"frame {n}", "cannot be read as an image")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if plan is None:
            src_wh = (img.shape[1], img.shape[0])
            out_hw = (custom.height or src_wh[1], custom.width or src_wh[0])
            plan = crop_box((src_wh[1], src_wh[0]), out_hw)
        if (img.shape[1], img.shape[0]) != src_wh:
            raise CustomImportError(files[n], f"frame {n}", f"size {img.shape[1]}x{img.shape[0]} differs from frame 0's {src_wh[0]}x{src_wh[1]}")
        out.append(crop_resize_frames(img, plan, out_hw))
    K = crop_resize_intrinsics(_to_video_k(track, src_wh, item.poses)[picked], plan, out_hw)
    return np.stack(out), picked, cfg.fps or cfg.image_fps, src_wh, track, K


def scale_factor(c2w: Tensor, target_step: float) -> tuple[float, float]:
    """(factor, median step before): the factor that makes the median moving per-frame step ``target_step``.

    Steps under 1e-9 of the largest are treated as standing still; a camera that never moves keeps factor 1.
    """
    steps = (c2w[1:, :3, 3] - c2w[:-1, :3, 3]).norm(dim=-1)
    if steps.numel() == 0 or float(steps.max()) <= 0:
        return 1.0, 0.0
    moving = steps[steps > 1e-9 * float(steps.max())]
    median = float(moving.median())
    return target_step / median, median


# ----------------------------------------------------------------------------- clips


def import_item(item: FolderItem, cfg: FolderImportConfig = FolderImportConfig()) -> list[dict]:
    """Contract clips (validated) from one video of the folder."""
    from data.contract import validate_clip

    if (cfg.width is None) != (cfg.height is None):
        raise CustomImportError(item.video, "size", "give both width and height, or neither")
    track = read_frame_poses(item.poses)
    custom = CustomImportConfig(width=cfg.width, height=cfg.height, fps=cfg.fps, latent_stride=cfg.latent_stride)
    if item.video.is_dir():
        frames, picked, fps, src_wh, track, K = _read_image_folder(item, track, cfg, custom)
    else:
        frames, picked, fps, src_wh, track, K = _decode(item.video, item.poses, track, custom)
    recorded = None
    if item.actions is not None:
        recorded = read_actions(item.actions)
        if recorded.shape[0] != track.c2w.shape[0]:
            raise CustomImportError(item.actions, "frames", f"has {recorded.shape[0]} actions but {item.video.name} has "
                                    f"{track.c2w.shape[0]} frames (one action entry per frame needed)")
        if cfg.fps:  # keys over a dropped frame are still held on the way to the kept one
            held = [recorded[(picked[j - 1] + 1 if j else 0): p + 1].any(0) for j, p in enumerate(picked)]
            recorded = torch.stack(held)
        else:
            recorded = recorded[picked]
    c2w_all = track.c2w[picked].clone()
    factor, before = 1.0, None
    if cfg.normalize_scale:
        factor, before = scale_factor(c2w_all, cfg.target_step)
        c2w_all[:, :3, 3] *= factor
        print(f"{item.name}: median camera step {before:.4g} per frame -> translations x {factor:.4g} "
              f"(target {cfg.target_step} units/frame)" if before else f"{item.name}: camera never moves, scale kept",
              file=sys.stderr, flush=True)
    thresholds = MotionThresholds(translation=cfg.key_translation, rotation_deg=cfg.key_rotation_deg)
    L = cfg.clip_frames or len(frames)
    clips = []
    for j, start in enumerate(range(0, len(frames), L)):
        stop = min(start + L, len(frames))
        if stop - start < 2 or (start > 0 and stop - start < 1 + cfg.latent_stride):
            break  # a short tail: too short for one latent step
        c2w = rebase_to_first(c2w_all[start:stop])
        if recorded is not None:
            keys = recorded[start:stop].clone()
            keys[0] = False  # nothing is held before a clip's first frame
        else:
            keys = frame_keys_from_poses(c2w, cfg.latent_stride, thresholds)
        meta = {
            "source": "folder",
            "scene": item.name,
            "video": item.video.name,
            "pose_file": item.poses.name,
            "fps": fps,
            "source_size": list(src_wh),
            "source_frames": [picked[start], picked[stop - 1]],
            "clip": j,
            "keys": (f"recorded ({item.actions.name}; {', '.join(KEY_NAMES)})" if recorded is not None
                     else f"derived from poses per {cfg.latent_stride}-frame latent (WorldPlay rule)"),
        }
        if cfg.normalize_scale:
            meta["scale_normalization"] = {"factor": factor, "median_step_before": before, "target_step": cfg.target_step}
        clip = {"video": frames[start:stop], "c2w": c2w.float().numpy(), "K": K[start:stop].float().numpy(),
                "keys": keys.numpy(), "caption": "", "meta": meta}
        validate_clip(clip, f"{item.video} clip {j}")
        clips.append(clip)
    return clips


def import_folder(src: str | Path, out: str | Path, cfg: FolderImportConfig = FolderImportConfig(), overwrite: bool = False) -> dict:
    """Import every video of ``src`` into shards under ``out``: all or nothing.

    Every pose and action file and every image folder's numbering is checked before any frame is
    decoded; shards are staged and moved into ``out`` only when every video imported.
    """
    from data.shards import ShardWriter

    items = find_items(src)
    for it in items:
        if it.video.is_dir():
            image_frames(it.video)
        read_frame_poses(it.poses)
        if it.actions is not None:
            read_actions(it.actions)
    n_clips = n_frames = 0
    with ShardWriter(out, prefix="folder", samples_per_shard=cfg.samples_per_shard, video_format=cfg.video_format,
                     fps=cfg.fps or 16.0, overwrite=overwrite, staged=True) as writer:
        for it in items:
            for clip in import_item(it, cfg):
                writer.write(clip)
                n_clips += 1
                n_frames += len(clip["video"])
    return {"videos": len(items), "clips": n_clips, "frames": n_frames, "out": str(out)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.import_folder", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder of videos / image folders with <stem>.json poses")
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (<= source)")
    p.add_argument("--size", default=None, help="output WxH (largest centred window of that aspect, resized)")
    p.add_argument("--image-fps", type=float, default=16.0, help="frame rate of image folders")
    p.add_argument("--clip-frames", type=int, default=0, help="split videos into clips of this many frames (0: whole video)")
    p.add_argument("--latent-stride", type=int, default=4)
    p.add_argument("--normalize-scale", action="store_true", help="scale translations to a common per-frame step")
    p.add_argument("--target-step", type=float, default=0.02, help="median per-frame camera step after --normalize-scale")
    p.add_argument("--video-format", choices=("mp4", "lossless"), default="mp4")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    width = height = None
    if args.size:
        try:
            width, height = parse_wxh(args.size)
        except ValueError as e:
            p.error(str(e))
    if args.target_step <= 0:
        p.error(f"--target-step must be > 0, got {args.target_step}")
    cfg = FolderImportConfig(width=width, height=height, fps=args.fps, image_fps=args.image_fps, clip_frames=args.clip_frames,
                             latent_stride=args.latent_stride, normalize_scale=args.normalize_scale,
                             target_step=args.target_step, video_format=args.video_format)
    try:
        summary = import_folder(args.src, args.out, cfg, args.overwrite)
    except (CustomImportError, FileExistsError, NotADirectoryError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
