"""Camera paths of the ``long`` and ``action`` protocols, at latent rate, driven by held keys.

:func:`plan_path` picks the source. A clip with a verified synthetic scene gets the data package's
own planner (``data.synthetic.plan_trajectory``: the trajectories training clips are made of,
collision-free, ``revisit`` returning bit-exactly), run at the model's stride and motion steps,
and the true render of its first pose becomes the conditioning image. Any other clip starts at its
own first frame and pose with the walk below (no scene, so no collision checks).

``random_walk`` draws WorldCompass-style composite actions (single moves, rotations, move +
rotation, yaw + pitch, standing still), each held for a segment of latents, and integrates them
with ``data.actions.keys_to_motion`` (one key step per latent: the bundle's ``MotionSteps``). The
returned keys are the ones applied, so ``data.actions.poses_to_keys`` of the poses gives them back.
It knows nothing of obstacles: it is for clips without a scene.
``out_and_back`` turns an outbound path into a revisit path whose return poses are *exact* copies
of outbound poses (the pose list reversed), so every return latent has an outbound twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionSteps, action_id_to_keys, keys_to_motion, poses_to_keys
from data.geometry import camera_forward, invert_rigid
from data.latents import latent_frame_index, latent_keys_from_frames, num_frames
from eval.protocols.clips import EvalClip
from eval.protocols.config import WalkConfig

__all__ = ["EvalPath", "plan_path", "random_walk", "out_and_back"]

# Translation classes: 1..4 single keys (W, S, D, A), 5..8 diagonal pairs; rotation classes: 1..4
# yaw right, yaw left, pitch up, pitch down, 5..8 yaw + pitch pairs (the data.actions group table).
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
) -> tuple[Tensor, Tensor]:
    """Keys bool [T, 8] (keys[0] none) and world poses c2w float64 [T, 4, 4] of a random composite walk.

    c2w0 [4, 4]: the start pose (identity by default). A pitch step that would take the view more
    than ``cfg.max_pitch_deg`` from the start camera's horizon is dropped from that latent.
    """
    cfg = cfg or WalkConfig()
    cfg.validate()
    if num_latents < 1:
        raise ValueError(f"random_walk: num_latents must be >= 1, got {num_latents}")
    pose = torch.eye(4, dtype=torch.float64) if c2w0 is None else torch.as_tensor(c2w0, dtype=torch.float64).clone()
    start_inv = invert_rigid(pose)
    ids = [0]
    poses = [pose]
    t, r_held, left = 0, 0, 0
    while len(ids) < num_latents:
        if left == 0:
            t, r_held = _sample_action(rng, cfg)
            left = int(rng.integers(cfg.segment_min, cfg.segment_max + 1))
        r = r_held
        yaw, pitch = _SPLIT[r]
        if pitch:  # keep the view within the pitch band
            tilted = pose @ keys_to_motion(action_id_to_keys(torch.tensor(_JOIN[(0, pitch)])), steps)
            if abs(_elevation_deg(tilted, start_inv)) > cfg.max_pitch_deg:
                r = _JOIN[(yaw, 0)]
        pose = pose @ keys_to_motion(action_id_to_keys(torch.tensor(9 * t + r)), steps)
        ids.append(9 * t + r)
        poses.append(pose)
        left -= 1
    keys = action_id_to_keys(torch.tensor(ids, dtype=torch.int64))
    assert keys.shape == (num_latents, NUM_KEYS)
    return keys, torch.stack(poses)


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


@dataclass
class EvalPath:
    """A latent-rate camera path to generate along, with what it is compared against.

    c2w [T, 4, 4] world poses and keys [T, 8] (keys[0] none) of the latents; image uint8 [H, W, 3]
    the conditioning frame; truth uint8 [T, H, W, 3] the true latent frames (synthetic scenes
    only); pairs int64 [P, 2] of (return latent, outbound latent) with identical poses (revisit).
    """

    c2w: Tensor
    keys: Tensor
    image: np.ndarray
    truth: Optional[np.ndarray]
    pairs: Optional[Tensor]
    source: str
    notes: list[str] = field(default_factory=list)


def _planned(
    kind: str, clip: EvalClip, T: int, stride: int, steps: MotionSteps, rng: np.random.Generator,
    start: Optional[Tensor] = None,
) -> EvalPath:
    """The synthetic planner's trajectory at the model's stride and steps, rendered."""
    from data.synthetic import TrajectoryConfig, plan_trajectory

    tcfg = TrajectoryConfig(stride=stride, latent_translation=steps.translation, latent_rotation_deg=steps.rotation_deg)
    F = num_frames(T, stride)
    traj = plan_trajectory(kind, clip.scene, F, rng, tcfg, start=start)
    c2w = traj.c2w[latent_frame_index(F, stride)]
    keys = latent_keys_from_frames(traj.keys, stride)
    truth = clip.render(c2w)
    pairs = None
    if kind == "revisit":
        turn, pause = traj.info["turn_frame"] // stride, traj.info["pause_frames"] // stride
        ret = torch.arange(turn + pause + 1, T)
        pairs = torch.stack([ret, 2 * turn + pause - ret], dim=1)
        if not torch.equal(c2w[pairs[:, 0]], c2w[pairs[:, 1]]):
            raise RuntimeError(f"{clip.name}: the planned revisit path does not return through its outbound poses")
    return EvalPath(c2w, keys, truth[0], truth, pairs, f"data.synthetic {kind} planner")


def plan_path(
    kind: str, clip: EvalClip, num_latents: int, stride: int, steps: MotionSteps, rng: np.random.Generator,
    cfg: Optional[WalkConfig] = None, start: Optional[Tensor] = None,
) -> EvalPath:
    """A ``revisit`` or ``random`` path of ``num_latents`` latents for ``clip`` (see the module docstring).

    ``start`` (synthetic scenes only) fixes the first world pose c2w [4, 4], e.g. to branch a second
    path off the first one's start (the ``control`` protocol).
    """
    if kind not in ("revisit", "random"):
        raise ValueError(f"plan_path: kind must be 'revisit' or 'random', got {kind!r}")
    notes: list[str] = []
    if start is not None and clip.scene is None:
        raise ValueError(f"plan_path: {clip.name} has no synthetic scene; a start pose needs one")
    if clip.scene is not None:
        try:
            return _planned(kind, clip, num_latents, stride, steps, rng, start)
        except ValueError as e:  # e.g. no free start in this scene
            notes.append(f"synthetic planner failed ({e}): walked from the clip's first pose instead")
    n = (num_latents + 1) // 2 if kind == "revisit" else num_latents
    keys, c2w = random_walk(n, rng, steps, cfg, clip.c2w[0])
    pairs = None
    if kind == "revisit":
        c2w, pairs = out_and_back(c2w, num_latents)
        keys = poses_to_keys(c2w)  # the keys the poses imply (the return inverts the outbound motion)
    return EvalPath(c2w, keys, clip.video[0], None, pairs, "walk from the clip's first pose", notes)
