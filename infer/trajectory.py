"""The camera path of a generation: a pose JSON or a pose string -> per-latent poses, intrinsics, actions.

Rules (one for every input, so the sidecar and the model always agree):

* **Poses.** A WorldPlay pose JSON gives per-latent c2w (``extrinsic``) and pixel ``K`` (research
  §9.2a). A pose string (``"w-3, right-1"``) gives held keys, integrated into poses by
  :func:`data.poseio.pose_string_to_poses` with the bundle's per-latent steps (WorldPlay: 0.08
  units, 3 deg). Poses are re-based so that latent 0 is the identity (PRoPE and the memory only see
  relative geometry, so this changes nothing but the numbers).
* **Actions.** Always from the poses, with :func:`data.latents.latent_action_ids` and the bundle's
  training thresholds: the discrete action and the camera PRoPE sees can never disagree. For a pose
  string these equal the held keys' ids (the steps exceed the thresholds, checked by the settings).
* **Intrinsics.** A pixel K refers to a frame of size (2·cx, 2·cy) (WorldPlay's convention: the
  principal point is the centre; its default K is for 1920x1080). The generated video is that frame
  centre-cropped to the bundle's aspect and resized to its size, which is exactly what the trainer
  does to training clips and :mod:`infer.image` does to the image; K goes through the same crop
  and resize (:func:`data.geometry.crop_intrinsics`, :func:`~data.geometry.resize_intrinsics`) and
  is then normalised by the bundle's size. When the aspects match, this is a pure scale and the
  normalised intrinsics are preserved exactly (fx/W, fy/H, 0.5, 0.5).
* **Length.** An ``ar`` bundle generates chunks of ``chunk_size`` latents and a ``window`` bundle
  windows of ``window_latents``: the latent count must be a positive multiple of that unit. Frames
  are ``1 + stride·(latents − 1)`` (the autoencoder's causal grouping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from data.actions import MotionSteps, MotionThresholds, keys_to_action_id, poses_to_keys
from data.geometry import crop_intrinsics, make_intrinsics, normalize_intrinsics, rebase_to_first, resize_intrinsics
from data.latents import latent_action_ids
from data.latents import num_frames as frames_of_latents
from data.poseio import pose_string_to_poses, read_pose_json
from infer.errors import InferError
from infer.image import center_crop_box

__all__ = [
    "WORLDPLAY_K",
    "WORLDPLAY_K_SIZE",
    "Trajectory",
    "TrajectoryLengthError",
    "normalized_intrinsics",
    "default_intrinsics",
    "load_trajectory",
    "check_length",
    "move_slices",
]

# WorldPlay's default pixel intrinsics and the (H, W) they refer to (research/worldplay.md §9.2a).
WORLDPLAY_K = ((969.697, 0.0, 960.0), (0.0, 969.697, 540.0), (0.0, 0.0, 1.0))
WORLDPLAY_K_SIZE = (1080, 1920)


class TrajectoryLengthError(InferError):
    """A trajectory whose latent count does not fit the bundle's chunk rules."""


@dataclass
class Trajectory:
    """Per-latent conditioning of a whole generation (T latents, latent 0 = the image's camera).

    c2w [T, 4, 4] float64 (c2w[0] = identity), K [T, 3, 3] float64 normalised for the bundle's
    size, actions [T] int64 (actions[0] = 0), keys [T, 8] bool (the keys the motion implies, or the
    pose string's keys). ``source`` is "json" or "string"; ``spec`` the --pose argument.
    """

    c2w: Tensor
    K: Tensor
    actions: Tensor
    keys: Tensor
    source: str
    spec: str

    @property
    def num_latents(self) -> int:
        return self.c2w.shape[0]


def normalized_intrinsics(K: Tensor, height: int, width: int, where: str = "K") -> Tensor:
    """Normalised intrinsics [..., 3, 3] (float64) for a (height, width) video from pixel K [..., 3, 3].

    Each K refers to a frame of size (2·cy, 2·cx); it is centre-cropped to the target aspect and
    resized like the image (see the module docstring), then divided by the target size.
    """
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.shape[-2:] != (3, 3):
        raise InferError(f"{where}: intrinsics must be [..., 3, 3], got {list(K.shape)}")
    flat = K.reshape(-1, 3, 3)
    out = torch.empty_like(flat)
    for i, k in enumerate(flat):
        fx, fy, cx, cy = float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])
        if not all(math.isfinite(v) and v > 0 for v in (fx, fy, cx, cy)):
            raise InferError(f"{where}: entry {i} needs positive fx, fy, cx, cy, got fx={fx} fy={fy} cx={cx} cy={cy}")
        src = (max(1, round(2 * cy)), max(1, round(2 * cx)))
        top, left, ch, cw = center_crop_box(src, (height, width))
        k = resize_intrinsics(crop_intrinsics(k, top, left), (ch, cw), (height, width))
        out[i] = normalize_intrinsics(k, width, height)
    return out.reshape(K.shape)


def default_intrinsics(height: int, width: int, fov_x_deg: Optional[float] = None) -> Tensor:
    """Normalised K [3, 3] (float64) used when the trajectory gives none.

    ``fov_x_deg`` (the bundle's camera, square pixels at its size), else WorldPlay's default K.
    """
    if fov_x_deg is not None:
        if not 0.0 < fov_x_deg < 180.0:
            raise InferError(f"fov_x_deg must lie in (0, 180), got {fov_x_deg}")
        return normalize_intrinsics(make_intrinsics(fov_x_deg, width, height).double(), width, height)
    return normalized_intrinsics(torch.tensor(WORLDPLAY_K, dtype=torch.float64), height, width, "WorldPlay default K")


def _is_json_path(pose: str) -> bool:
    return pose.strip().lower().endswith(".json") or Path(pose).is_file()


def load_trajectory(
    pose: str,
    *,
    height: int,
    width: int,
    steps: MotionSteps = MotionSteps(),
    thresholds: MotionThresholds = MotionThresholds(),
    fov_x_deg: Optional[float] = None,
) -> Trajectory:
    """The trajectory of a ``--pose`` argument: a WorldPlay pose JSON path or a pose string."""
    pose = str(pose)
    if _is_json_path(pose):
        path = Path(pose)
        if not path.is_file():
            raise InferError(f"--pose {pose}: pose JSON file not found")
        try:
            c2w, K_pix = read_pose_json(path)
        except ValueError as e:  # the reader names the file already
            raise InferError(f"--pose {pose}: {str(e).removeprefix(f'{path}: ')}") from None
        c2w = rebase_to_first(c2w)
        K = normalized_intrinsics(K_pix, height, width, where=f"--pose {pose}: K")
        keys = poses_to_keys(c2w, thresholds)
        source = "json"
    else:
        try:
            keys, c2w = pose_string_to_poses(pose, steps)
        except ValueError as e:
            raise InferError(f"--pose: {e}") from None
        K = default_intrinsics(height, width, fov_x_deg).expand(c2w.shape[0], 3, 3).clone()
        source = "string"
    actions = latent_action_ids(c2w, thresholds)
    if source == "string" and not torch.equal(actions, keys_to_action_id(keys)):
        bad = int((actions != keys_to_action_id(keys)).nonzero()[0])
        raise InferError(f"--pose {pose!r}: latent {bad}: the integrated motion does not give the held keys' action id")
    return Trajectory(c2w=c2w, K=K, actions=actions, keys=keys.bool(), source=source, spec=pose)


def check_length(num_latents: int, unit: int, mode: str, temporal_stride: int, *, where: str = "trajectory") -> None:
    """Raise TrajectoryLengthError unless ``num_latents`` is a positive multiple of ``unit``.

    The message lists the nearest valid latent counts with their frame counts and pose-string moves.
    """
    if num_latents >= unit and num_latents % unit == 0:
        return
    what = "chunk_size" if mode == "ar" else "window_latents"
    base = num_latents // unit
    candidates = [n * unit for n in range(max(1, base - 1), base + 3)]
    near = sorted(sorted(candidates, key=lambda n: (abs(n - num_latents), n))[:3])
    options = ", ".join(
        f"{n} latents = {frames_of_latents(n, temporal_stride)} frames ({n - 1} pose-string moves)" for n in near
    )
    raise TrajectoryLengthError(
        f"{where} has {num_latents} latents ({frames_of_latents(max(num_latents, 1), temporal_stride)} frames); "
        f"this {mode} bundle generates {unit} latents at a time ({what}), so the count must be a multiple of {unit}. "
        f"Nearest valid lengths: {options}"
    )


def move_slices(num_latents: int, unit: int) -> list[slice]:
    """Latent ranges of each step() call: the first chunk adds latents 1..unit-1 to the image's latent 0,
    later chunks ``unit`` latents each."""
    return [slice(max(1, s), s + unit) for s in range(0, num_latents, unit)]
