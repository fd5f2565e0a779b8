"""Camera paths of the ``long`` and ``action`` protocols, at latent rate, driven by held keys.

``random_walk`` draws WorldCompass-style composite actions (single moves, rotations, move +
rotation, yaw + pitch, standing still), each held for a segment of latents, and integrates them
with ``data.actions.keys_to_motion`` (one key step per latent: the bundle's ``MotionSteps``). The
returned keys are the ones applied, so ``data.actions.poses_to_keys`` of the poses gives them back.
``out_and_back`` turns an outbound path into a revisit path whose return poses are *exact* copies
of outbound poses (the pose list reversed), so every return latent has an outbound twin.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionSteps, action_id_to_keys, keys_to_motion
from data.geometry import camera_center, camera_forward, invert_rigid
from eval.protocols.config import WalkConfig

__all__ = ["random_walk", "out_and_back"]

_W, _S, _D, _A = 1, 2, 3, 4  # translation classes (data.actions group table)
_YAW_R, _YAW_L, _UP, _DOWN = 1, 2, 3, 4  # rotation classes; 5..8 are yaw + pitch pairs
# Rotation class -> (yaw class, pitch class) and back (data.actions pair table: R+up, R+down, L+up, L+down).
_SPLIT = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (0, 3), 4: (0, 4), 5: (1, 3), 6: (1, 4), 7: (2, 3), 8: (2, 4)}
_JOIN = {v: k for k, v in _SPLIT.items()}


def _sample_action(rng: np.random.Generator, cfg: WalkConfig) -> tuple[int, int]:
    """(translation class, rotation class) of one composite action."""
    w = np.array([cfg.w_move, cfg.w_rotate, cfg.w_move_rotate, cfg.w_rotate_rotate, cfg.w_still], dtype=np.float64)
    kind = int(rng.choice(5, p=w / w.sum()))

    def move() -> int:
        return int(rng.integers(5, 9)) if rng.random() < cfg.diagonal_prob else int(rng.integers(1, 5))

    def rotate() -> int:
        return int(rng.integers(3, 5)) if rng.random() < cfg.pitch_prob else int(rng.integers(1, 3))

    if kind == 0:
        return move(), 0
    if kind == 1:
        return 0, rotate()
    if kind == 2:
        return move(), rotate()
    if kind == 3:
        return 0, int(rng.integers(5, 9))
    return 0, 0


def _elevation_deg(c2w: Tensor, c2w0_inv: Tensor) -> float:
    """Elevation of the view direction above the start camera's horizon (its x-z plane; y points down)."""
    f = camera_forward(c2w0_inv @ c2w)
    return float(torch.rad2deg(torch.asin((-f[1]).clamp(-1.0, 1.0))))


def random_walk(
    num_latents: int,
    rng: np.random.Generator,
    steps: MotionSteps = MotionSteps(),
    cfg: Optional[WalkConfig] = None,
    c2w0: Optional[Tensor] = None,
    scene: Optional[Any] = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Keys bool [T, 8] (keys[0] none) and world poses c2w float64 [T, 4, 4] of a random composite walk.

    c2w0 [4, 4]: the start pose (identity by default). ``scene`` (a ``data.synthetic`` Scene): moves
    that would leave free space (``Scene.free`` with ``cfg.margin``) become turns. Returns notes too
    (e.g. when the start itself is not free and collisions cannot be checked).
    """
    cfg = cfg or WalkConfig()
    cfg.validate()
    if num_latents < 1:
        raise ValueError(f"random_walk: num_latents must be >= 1, got {num_latents}")
    pose = torch.eye(4, dtype=torch.float64) if c2w0 is None else torch.as_tensor(c2w0, dtype=torch.float64).clone()
    start_inv = invert_rigid(pose)
    notes: list[str] = []
    check = scene is not None
    if check and not bool(scene.free(camera_center(pose), cfg.margin)):
        check = False
        notes.append(f"start pose is within {cfg.margin} of an object or wall: collisions not checked")

    ids = [0]
    poses = [pose]
    t_cls, r_cls, left = 0, 0, 0
    while len(ids) < num_latents:
        if left == 0:
            t_cls, r_cls = _sample_action(rng, cfg)
            left = int(rng.integers(cfg.segment_min, cfg.segment_max + 1))
        t, r = t_cls, r_cls
        yaw, pitch = _SPLIT[r]
        if pitch:  # keep the view within the pitch band: drop a pitch step that would leave it
            elev = _elevation_deg(pose @ keys_to_motion(action_id_to_keys(torch.tensor(_JOIN[(0, pitch)])), steps), start_inv)
            if abs(elev) > cfg.max_pitch_deg:
                r = _JOIN[(yaw, 0)]
        nxt = pose @ keys_to_motion(action_id_to_keys(torch.tensor(9 * t + r)), steps)
        if check and t and not bool(scene.free(camera_center(nxt), cfg.margin)):
            # Blocked: turn instead for the rest of the segment (a turn never moves the camera).
            t_cls, r_cls = 0, _JOIN[(yaw or int(rng.integers(1, 3)), 0)]
            t, r = t_cls, r_cls
            nxt = pose @ keys_to_motion(action_id_to_keys(torch.tensor(r)), steps)
        ids.append(9 * t + r)
        poses.append(nxt)
        pose = nxt
        left -= 1
    keys = action_id_to_keys(torch.tensor(ids, dtype=torch.int64))
    assert keys.shape == (num_latents, NUM_KEYS)
    return keys, torch.stack(poses), notes


def out_and_back(c2w_out: Tensor, num_latents: int) -> tuple[Tensor, Tensor]:
    """A revisit path of ``num_latents`` poses from outbound poses [n, 4, 4], n = (num_latents + 1) // 2.

    Out p_0 .. p_{n-1}, one pause at p_{n-1} when ``num_latents`` is even, then back p_{n-2} .. p_0.
    Returns c2w [num_latents, 4, 4] and pairs int64 [n - 1, 2] of (return index, outbound index)
    with identical poses.
    """
    n = (num_latents + 1) // 2
    if num_latents < 3 or c2w_out.shape[0] != n:
        raise ValueError(f"out_and_back: {num_latents} latents need {n} >= 2 outbound poses, got {c2w_out.shape[0]}")
    pause = num_latents - (2 * n - 1)
    back = torch.arange(n - 2, -1, -1)
    c2w = torch.cat([c2w_out, c2w_out[-1:].expand(pause, 4, 4), c2w_out[back]])
    ret = torch.arange(n + pause, num_latents)
    return c2w, torch.stack([ret, back], dim=1)
