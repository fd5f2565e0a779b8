"""Camera trajectories driven by held keys, with collision checks, for the synthetic world.

A trajectory is per-frame held keys ``keys`` bool [F, 8] and the exact poses ``c2w`` float64
[F, 4, 4] they produce under ``data.actions`` semantics: ``c2w[i] = c2w[i-1] @ keys_to_motion(
keys[i], steps)`` with the per-frame steps of :func:`frame_steps` (``keys[0]`` holds nothing).
Actions are held for whole latents (``stride`` frames), so per-latent keys recomputed from
latent poses (``data.latents``) equal the held keys, and one latent of a held key moves WorldPlay's
0.08 units / turns 3 deg by default.

Kinds:
- ``random``: composite actions (moves, yaw, move+yaw, a little pitch, pauses) held for random
  durations, as WorldCompass mixes them; mostly yaw, pitch bounded.
- ``revisit``: a random walk out, then the same poses in reverse back to the start. The walk
  out uses only actions whose exact inverse is again a key action (pure translations, a single
  rotation), so the return keys are the inverse keys and the return poses are bit-exact copies.
- ``orbit``: strafe while turning (D + yaw-left or A + yaw-right) around a free circle, looking
  inward; turning on a fraction of latents sets the radius.
- ``mixed``: one of the above per clip.

The camera never passes through objects or walls: before a latent is committed its poses are
checked (camera centre against inflated footprints and the room), and a blocked action is
replaced, e.g. by a turn, so keys and poses always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionSteps, keys_to_motion
from data.geometry import make_pose, rotation_y
from data.latents import num_latents
from data.synthetic.config import TrajectoryConfig
from data.synthetic.scene import Scene

__all__ = ["TRAJECTORY_KINDS", "Trajectory", "frame_steps", "plan_trajectory", "make_trajectory", "inverse_keys"]

TRAJECTORY_KINDS = ("random", "revisit", "orbit", "mixed")
W, S, D, A, YAW_R, YAW_L, PITCH_U, PITCH_D = range(NUM_KEYS)
_INVERSE = (S, W, A, D, YAW_L, YAW_R, PITCH_D, PITCH_U)  # the key that undoes each key
_TRANSLATIONS = ((W,), (S,), (D,), (A,), (W, D), (W, A), (S, D), (S, A))
_TRANSLATION_P = np.array([0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
_CATEGORIES = ("move", "yaw", "move_yaw", "pitch", "move_pitch", "yaw_pitch", "still")
_INVERTIBLE = ("move", "yaw", "pitch", "still")  # exact inverse is again a key action

Held = tuple[int, ...]  # indices of the keys held during one latent


@dataclass
class Trajectory:
    """Held keys bool [F, 8], exact poses float64 [F, 4, 4], the kind actually drawn and kind-specific info."""

    keys: Tensor
    c2w: Tensor
    kind: str
    info: dict[str, Any] = field(default_factory=dict)


def frame_steps(cfg: TrajectoryConfig) -> MotionSteps:
    """Per-frame key increments: the per-latent increments divided by the temporal stride."""
    return MotionSteps(translation=cfg.latent_translation / cfg.stride, rotation_deg=cfg.latent_rotation_deg / cfg.stride)


def inverse_keys(keys: Tensor) -> Tensor:
    """Keys [..., 8] that undo ``keys`` (W<->S, D<->A, yaw R<->L, pitch up<->down)."""
    return keys[..., list(_INVERSE)]


def _held_tensor(held: Held) -> Tensor:
    k = torch.zeros(NUM_KEYS, dtype=torch.bool)
    k[list(held)] = True
    return k


class _Walker:
    """Applies held keys one latent at a time, refusing latents that collide or tilt too far."""

    def __init__(self, scene: Scene, cfg: TrajectoryConfig, c2w0: Tensor):
        self.scene, self.cfg = scene, cfg
        self.steps = frame_steps(cfg)
        self.poses: list[Tensor] = [c2w0]
        self.keys: list[Tensor] = [torch.zeros(NUM_KEYS, dtype=torch.bool)]
        self._motions: dict[Held, Tensor] = {}
        if not self.valid(c2w0[None]):
            raise ValueError("trajectory start pose is not free (inside an object, too close to a wall, or tilted)")

    @property
    def pose(self) -> Tensor:
        return self.poses[-1]

    def elevation_deg(self) -> float:
        """Elevation of the view direction above the horizon (world up is -y)."""
        return math.degrees(math.asin(max(-1.0, min(1.0, -float(self.pose[1, 2])))))

    def valid(self, poses: Tensor) -> bool:
        """Whether poses [n, 4, 4] keep clearance, stay in the height band and within the tilt bounds."""
        cfg = self.cfg
        centres = poses[:, :3, 3]
        if not bool(self.scene.free(centres, cfg.margin).all()):
            return False
        if bool(((-centres[:, 1] - cfg.eye_height).abs() > cfg.height_band + 1e-9).any()):
            return False
        elev = torch.rad2deg(torch.asin((-poses[:, 1, 2]).clamp(-1, 1))).abs()
        roll = torch.rad2deg(torch.asin(poses[:, 1, 0].clamp(-1, 1))).abs()
        return bool((elev <= cfg.max_pitch_deg + 1e-6).all() and (roll <= cfg.max_roll_deg + 1e-6).all())

    def _latent(self, held: Held) -> Tensor:
        if held not in self._motions:
            self._motions[held] = keys_to_motion(_held_tensor(held), self.steps)
        motion = self._motions[held]
        out, pose = [], self.pose
        for _ in range(self.cfg.stride):  # sequential by nature: each frame composes on the last
            pose = pose @ motion
            out.append(pose)
        return torch.stack(out)

    def apply(self, options: list[Held]) -> Held:
        """Hold the first of ``options`` that is valid for one latent; standing still always is."""
        for held in [*options, ()]:
            poses = self._latent(held)
            if held == () or self.valid(poses):
                self.poses.extend(poses)
                self.keys.extend([_held_tensor(held)] * self.cfg.stride)
                return held
        raise AssertionError("unreachable: standing still is always valid")

    def result(self) -> tuple[Tensor, Tensor]:
        return torch.stack(self.keys), torch.stack(self.poses)


def _random_start(scene: Scene, cfg: TrajectoryConfig, rng: np.random.Generator, clearance: float) -> Tensor:
    """A level pose at eye height, at a random free spot with ``clearance``, facing a random direction."""
    for _ in range(20):
        x = rng.uniform(-scene.half_x, scene.half_x, 256)
        z = rng.uniform(-scene.half_z, scene.half_z, 256)
        pts = torch.tensor(np.stack([x, np.full_like(x, -cfg.eye_height), z], 1))
        ok = scene.free(pts, clearance).nonzero()
        if len(ok):
            yaw = float(rng.uniform(-180.0, 180.0))
            return make_pose(rotation_y(yaw), pts[int(ok[0, 0])])
    raise ValueError(f"scene (seed {scene.seed}) has no free spot with clearance {clearance} at eye height {cfg.eye_height}")


def _random_walk(walker: _Walker, rng: np.random.Generator, latents: int, invertible: bool) -> None:
    """Composite actions held for random durations; blocked moves turn instead."""
    cfg = walker.cfg
    cats = _INVERTIBLE if invertible else _CATEGORIES
    weights = np.array([getattr(cfg, f"w_{c}") for c in cats], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError(f"trajectory category weights must not all be zero: {dict(zip(cats, weights))}")
    weights /= weights.sum()
    turn = int(rng.choice([YAW_R, YAW_L]))
    held: Held = ()
    left = 0
    for _ in range(latents):
        if left == 0:
            held = _sample_action(rng, str(rng.choice(cats, p=weights)), walker.elevation_deg())
            left = int(rng.integers(cfg.segment_min_latents, cfg.segment_max_latents + 1))
        options = [held]
        if any(k in (PITCH_U, PITCH_D) for k in held):
            options.append(tuple(k for k in held if k not in (PITCH_U, PITCH_D)))
        if any(k in (W, S, D, A) for k in held):
            options.append((turn,))
        applied = walker.apply(options)
        left -= 1
        if applied != held:  # blocked or too tilted: keep doing what worked for a while
            if applied == (turn,):
                left = int(rng.integers(2, 6))
                turn = int(rng.choice([YAW_R, YAW_L]))
            held = applied


def _sample_action(rng: np.random.Generator, category: str, elevation_deg: float) -> Held:
    trans = _TRANSLATIONS[int(rng.choice(len(_TRANSLATIONS), p=_TRANSLATION_P))]
    yaw = (int(rng.choice([YAW_R, YAW_L])),)
    # Pitch leans back towards level most of the time, so it stays small.
    toward_level = PITCH_D if elevation_deg > 0 else PITCH_U
    pitch = (toward_level if abs(elevation_deg) > 1e-6 and rng.random() < 0.6 else int(rng.choice([PITCH_U, PITCH_D])),)
    return {
        "move": trans,
        "yaw": yaw,
        "move_yaw": trans + yaw,
        "pitch": pitch,
        "move_pitch": trans + pitch,
        "yaw_pitch": yaw + pitch,
        "still": (),
    }[category]


def _plan_random(
    scene: Scene, cfg: TrajectoryConfig, rng: np.random.Generator, T: int, start: Tensor | None = None
) -> Trajectory:
    walker = _Walker(scene, cfg, _random_start(scene, cfg, rng, cfg.margin + 0.3) if start is None else start)
    _random_walk(walker, rng, T - 1, invertible=False)
    return Trajectory(*walker.result(), kind="random")


def _plan_revisit(
    scene: Scene, cfg: TrajectoryConfig, rng: np.random.Generator, T: int, start: Tensor | None = None
) -> Trajectory:
    out_latents = (T - 1) // 2
    pause_latents = (T - 1) - 2 * out_latents
    walker = _Walker(scene, cfg, _random_start(scene, cfg, rng, cfg.margin + 0.3) if start is None else start)
    _random_walk(walker, rng, out_latents, invertible=True)
    keys, poses = walker.result()
    m = poses.shape[0] - 1  # the turning point (frame index)
    q = pause_latents * cfg.stride
    back_keys = inverse_keys(keys[1:].flip(0))  # frame m + q + i undoes outbound frame m - i + 1
    back_poses = poses[:-1].flip(0)  # frame m + q + i is outbound frame m - i, bit for bit
    keys = torch.cat([keys, torch.zeros(q, NUM_KEYS, dtype=torch.bool), back_keys])
    poses = torch.cat([poses, poses[-1:].expand(q, 4, 4), back_poses])
    info = {"turn_frame": m, "pause_frames": q}  # frame j >= m + q shows the pose of frame 2m + q - j
    return Trajectory(keys, poses, kind="revisit", info=info)


def _find_orbit(
    scene: Scene, cfg: TrajectoryConfig, rng: np.random.Generator, lo: float, hi: float, path: float
) -> tuple[float, float, float, float, int] | None:
    """(centre x, centre z, radius, start angle, sense) of a circle whose next ``path`` units of arc are free.

    Centres are objects (an orbit looks at something) three times in four, else free points.
    The camera at angle phi, facing the centre, moves to increasing phi when strafing right (sense +1).
    """
    footprint = scene.footprint_radius()
    for _ in range(300):
        if scene.num_objects and rng.random() < 0.75:
            i = int(rng.integers(scene.num_objects))
            cx, cz = float(scene.center[i, 0]), float(scene.center[i, 2])
            r_lo = max(lo, float(footprint[i]) + cfg.margin + 0.3)
        else:
            cx, cz = float(rng.uniform(-scene.half_x, scene.half_x)), float(rng.uniform(-scene.half_z, scene.half_z))
            r_lo = lo
        if r_lo > hi:
            continue
        r = float(rng.uniform(r_lo, hi))
        phi, sense = float(rng.uniform(0.0, 2 * math.pi)), int(rng.choice([1, -1]))
        sweep = min(2 * math.pi, (path + 0.3) / r)
        a = phi + sense * np.linspace(0.0, sweep, max(8, int(sweep * r / 0.1) + 1))
        pts = torch.tensor(np.stack([cx + r * np.cos(a), np.full_like(a, -cfg.eye_height), cz + r * np.sin(a)], 1))
        if bool(scene.free(pts, cfg.margin + 0.1).all()):
            return cx, cz, r, phi, sense
    return None


def _plan_orbit(scene: Scene, cfg: TrajectoryConfig, rng: np.random.Generator, T: int) -> Trajectory | None:
    steps = frame_steps(cfg)
    turn_rad = math.radians(steps.rotation_deg)
    tightest = steps.translation / (2 * math.sin(turn_rad / 2))  # radius when every latent turns
    path = (T - 1) * cfg.stride * steps.translation
    found = _find_orbit(scene, cfg, rng, max(tightest, cfg.orbit_radius_min), cfg.orbit_radius_max, path)
    if found is None:
        return None
    cx, cz, radius, phi, sense = found
    strafe, turn = (D, YAW_L) if sense > 0 else (A, YAW_R)
    pos = torch.tensor([cx + radius * math.cos(phi), -cfg.eye_height, cz + radius * math.sin(phi)], dtype=torch.float64)
    yaw = math.degrees(math.atan2(cx - float(pos[0]), cz - float(pos[2])))  # rotation_y(yaw) @ +z faces the centre
    walker = _Walker(scene, cfg, make_pose(rotation_y(yaw), pos))
    frac = tightest / radius  # share of latents that turn
    for i in range(1, T):
        turns = math.floor(i * frac + 0.5) > math.floor((i - 1) * frac + 0.5)
        walker.apply([(strafe, turn) if turns else (strafe,), (turn,)])
    info = {"orbit_centre_xz": [cx, cz], "orbit_radius": radius, "orbit_sense": sense}
    return Trajectory(*walker.result(), kind="orbit", info=info)


def _check_config(cfg: TrajectoryConfig) -> None:
    problems = []
    if cfg.stride < 1:
        problems.append(f"stride must be >= 1, got {cfg.stride}")
    if not 1 <= cfg.segment_min_latents <= cfg.segment_max_latents:
        problems.append(f"need 1 <= segment_min_latents <= segment_max_latents, got {cfg.segment_min_latents}, {cfg.segment_max_latents}")
    if cfg.latent_translation <= 0 or cfg.latent_rotation_deg <= 0:
        problems.append(f"latent steps must be positive, got {cfg.latent_translation}, {cfg.latent_rotation_deg}")
    if cfg.margin < 0 or cfg.height_band < 0:
        problems.append(f"margin and height_band must be >= 0, got {cfg.margin}, {cfg.height_band}")
    if cfg.orbit_radius_max <= 0 or cfg.orbit_radius_min > cfg.orbit_radius_max:
        problems.append(f"need 0 < orbit_radius_min <= orbit_radius_max, got {cfg.orbit_radius_min}, {cfg.orbit_radius_max}")
    if problems:
        raise ValueError("TrajectoryConfig: " + "; ".join(problems))


def plan_trajectory(
    kind: str, scene: Scene, num_frames: int, rng: np.random.Generator, config: TrajectoryConfig | None = None,
    start: Tensor | None = None,
) -> Trajectory:
    """A collision-free key-driven trajectory of ``num_frames`` (1 + stride * k) frames in ``scene``.

    ``mixed`` draws the kind from the config's weights; an ``orbit`` with no free circle falls
    back to ``random`` (the returned ``kind`` says which was drawn, ``info['fallback']`` why).
    ``start`` c2w [4, 4] (float64) fixes the first pose of a ``random`` or ``revisit`` path (it must
    be free: ValueError otherwise); None draws a free one.
    """
    cfg = config or TrajectoryConfig()
    _check_config(cfg)
    if kind not in TRAJECTORY_KINDS:
        raise ValueError(f"unknown trajectory kind {kind!r}; expected one of {TRAJECTORY_KINDS}")
    T = num_latents(num_frames, cfg.stride)
    if kind == "mixed":
        w = np.array([cfg.mix_random, cfg.mix_revisit, cfg.mix_orbit], dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError("trajectory mix weights (mix_random, mix_revisit, mix_orbit) must not all be zero")
        kind = str(rng.choice(["random", "revisit", "orbit"], p=w / w.sum()))
    if start is not None and kind not in ("random", "revisit"):
        raise ValueError(f"plan_trajectory: a start pose is supported for 'random' and 'revisit' paths, not {kind!r}")
    if kind == "orbit":
        traj = _plan_orbit(scene, cfg, rng, T)
        if traj is not None:
            return traj
        traj = _plan_random(scene, cfg, rng, T)
        traj.info["fallback"] = "no free orbit circle"
        return traj
    plan = _plan_revisit if kind == "revisit" else _plan_random
    return plan(scene, cfg, rng, T, start)


def make_trajectory(
    kind: str, scene: Scene, num_frames: int, rng: np.random.Generator, config: TrajectoryConfig | None = None
) -> tuple[Tensor, Tensor]:
    """Held keys bool [F, 8] and exact poses c2w float64 [F, 4, 4]; see :func:`plan_trajectory`."""
    traj = plan_trajectory(kind, scene, num_frames, rng, config)
    return traj.keys, traj.c2w
