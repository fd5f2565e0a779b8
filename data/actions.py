"""Discrete actions: held keys <-> the 81-class action id <-> camera motion.

Keys are bool [..., 8] in the order of the clip contract::

    0 W (forward)   1 S (back)   2 D (right)   3 A (left)          translation group
    4 yaw-right     5 yaw-left   6 pitch-up    7 pitch-down        rotation group

Each group of four maps to a 9-class id (WorldPlay's table): 0 none, 1..4 a single key (slot
order above), 5 slot0+slot2, 6 slot0+slot3, 7 slot1+slot2, 8 slot1+slot3. Opposing keys held
together (W+S, D+A, yaw R+L, up+down) cancel. ``action_id = 9 * translation + rotation``.

Motion is applied per step in the *previous* camera's frame: ``c2w_next = c2w @ [R | t]`` with
``R = Ry(yaw) @ Rx(pitch)`` and ``t = (dx, 0, dz)``, each held key adding one increment along
its axis (a diagonal W+D therefore moves ``step`` along both x and z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from data.geometry import euler_xyz_degrees, make_pose, relative_pose, rotation_x, rotation_y

NUM_KEYS = 8
NUM_ACTIONS = 81
KEY_NAMES = ("W", "S", "D", "A", "yaw_right", "yaw_left", "pitch_up", "pitch_down")

# 9-class table over one group's four slots, as (slot_a, slot_b) pairs; -1 = unused.
_PAIR_TABLE = ((-1, -1), (0, -1), (1, -1), (2, -1), (3, -1), (0, 2), (0, 3), (1, 2), (1, 3))


@dataclass(frozen=True)
class MotionThresholds:
    """When relative motion between two poses counts as a held key (WorldPlay §3.1 defaults)."""

    translation: float = 0.01  # minimum translation norm (scene units); WorldPlay inference uses 1e-4
    direction_deg: float = 60.0  # forward if angle(t, +z) < this; back if > 180 - this; likewise x
    rotation_deg: float = 0.05  # minimum |yaw| or |pitch| in degrees


@dataclass(frozen=True)
class MotionSteps:
    """Pose increments applied per step while a key is held (WorldPlay: 0.08 units, 3 deg per latent)."""

    translation: float = 0.08
    rotation_deg: float = 3.0


def group_class(slots: Tensor) -> Tensor:
    """9-class id [...] of one key group given bool slots [..., 4]; opposing keys cancel."""
    s = slots.bool()
    a = s[..., 0] & ~s[..., 1]  # slot0 without its opposite
    b = s[..., 1] & ~s[..., 0]
    c = s[..., 2] & ~s[..., 3]
    d = s[..., 3] & ~s[..., 2]
    first = torch.where(a, 1, torch.where(b, 2, 0))  # 0 none, 1 slot0, 2 slot1
    second = torch.where(c, 1, torch.where(d, 2, 0))  # 0 none, 1 slot2, 2 slot3
    # (first, second) -> class:  (0,0)0 (1,0)1 (2,0)2 (0,1)3 (0,2)4 (1,1)5 (1,2)6 (2,1)7 (2,2)8
    lut = torch.tensor([[0, 3, 4], [1, 5, 6], [2, 7, 8]], device=s.device)
    return lut[first, second]


def class_slots(cls: Tensor) -> Tensor:
    """Bool slots [..., 4] of a 9-class id [...]; the inverse of :func:`group_class`."""
    table = torch.zeros(9, 4, dtype=torch.bool)
    for k, (i, j) in enumerate(_PAIR_TABLE):
        for slot in (i, j):
            if slot >= 0:
                table[k, slot] = True
    if cls.min() < 0 or cls.max() > 8:
        raise ValueError(f"group class ids must lie in [0, 8], got range [{int(cls.min())}, {int(cls.max())}]")
    return table.to(cls.device)[cls.long()]


def keys_to_action_id(keys: Tensor) -> Tensor:
    """81-class action id [...] (int64) of held keys [..., 8]."""
    if keys.shape[-1] != NUM_KEYS:
        raise ValueError(f"keys must have {NUM_KEYS} entries in the last dim, got shape {tuple(keys.shape)}")
    return 9 * group_class(keys[..., :4]) + group_class(keys[..., 4:])


def action_id_to_keys(action_id: Tensor) -> Tensor:
    """Held keys [..., 8] of an 81-class action id [...]."""
    action_id = torch.as_tensor(action_id)
    if action_id.numel() and (action_id.min() < 0 or action_id.max() >= NUM_ACTIONS):
        raise ValueError(f"action ids must lie in [0, {NUM_ACTIONS}), got {action_id.tolist()}")
    return torch.cat([class_slots(action_id // 9), class_slots(action_id % 9)], dim=-1)


def motion_to_keys(rel: Tensor, thresholds: MotionThresholds = MotionThresholds()) -> Tensor:
    """Keys [..., 8] implied by relative poses rel [..., 4, 4] (motion expressed in the start camera)."""
    t = rel[..., :3, 3].double()
    norm = t.norm(dim=-1)
    moving = norm > thresholds.translation
    unit = t / norm.clamp_min(1e-12).unsqueeze(-1)
    cos_lim = torch.cos(torch.deg2rad(torch.tensor(thresholds.direction_deg, dtype=torch.float64)))
    fwd = moving & (unit[..., 2] > cos_lim)
    back = moving & (unit[..., 2] < -cos_lim)
    right = moving & (unit[..., 0] > cos_lim)
    left = moving & (unit[..., 0] < -cos_lim)
    ang = euler_xyz_degrees(rel[..., :3, :3].double())
    pitch, yaw = ang[..., 0], ang[..., 1]
    thr = thresholds.rotation_deg
    keys = torch.stack([fwd, back, right, left, yaw > thr, yaw < -thr, pitch > thr, pitch < -thr], dim=-1)
    return keys


def poses_to_keys(c2w: Tensor, thresholds: MotionThresholds = MotionThresholds()) -> Tensor:
    """Keys [..., N, 8] for a trajectory c2w [..., N, 4, 4]: step i holds the motion from pose i-1 to i.

    Step 0 has no predecessor and holds no keys (WorldPlay gives latent 0 action 0).
    """
    rel = relative_pose(c2w[..., :-1, :, :], c2w[..., 1:, :, :])
    moved = motion_to_keys(rel, thresholds)
    none = torch.zeros(*moved.shape[:-2], 1, NUM_KEYS, dtype=torch.bool, device=moved.device)
    return torch.cat([none, moved], dim=-2)


def keys_to_motion(keys: Tensor, steps: MotionSteps = MotionSteps()) -> Tensor:
    """Relative motion [..., 4, 4] (float64) produced by holding keys [..., 8] for one step."""
    k = keys.bool()
    trans_cls = group_class(k[..., :4])
    rot_cls = group_class(k[..., 4:])
    ts = class_slots(trans_cls).double()  # cancelled opposites removed
    rs = class_slots(rot_cls).double()
    dz = (ts[..., 0] - ts[..., 1]) * steps.translation
    dx = (ts[..., 2] - ts[..., 3]) * steps.translation
    yaw = (rs[..., 0] - rs[..., 1]) * steps.rotation_deg
    pitch = (rs[..., 2] - rs[..., 3]) * steps.rotation_deg
    R = rotation_y(yaw) @ rotation_x(pitch)
    t = torch.stack([dx, torch.zeros_like(dx), dz], dim=-1)
    return make_pose(R, t)


def keys_to_poses(keys: Tensor, steps: MotionSteps = MotionSteps(), c2w0: Tensor | None = None) -> Tensor:
    """Integrate held keys [N, 8] into a trajectory c2w [N, 4, 4] (float64); keys[0] is ignored.

    pose[0] = c2w0 (identity by default) and pose[i] = pose[i-1] @ motion(keys[i]).
    """
    if keys.ndim != 2 or keys.shape[-1] != NUM_KEYS:
        raise ValueError(f"keys must be [N, {NUM_KEYS}], got shape {tuple(keys.shape)}")
    motions = keys_to_motion(keys, steps)
    pose = torch.eye(4, dtype=torch.float64) if c2w0 is None else c2w0.double()
    out = [pose]
    for i in range(1, keys.shape[0]):  # sequential by nature: each step composes on the last
        pose = pose @ motions[i]
        out.append(pose)
    return torch.stack(out)
