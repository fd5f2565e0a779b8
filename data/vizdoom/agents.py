"""Agents that drive the ViZDoom player with held keys: explore, retrace a path, never stay stuck.

Every agent maps an observation (eye position, yaw, depth buffer) to the clip contract's held
keys bool [8] (W, S, D, A, yaw-right, yaw-left, pitch-up, pitch-down; pitch is never pressed).

- :class:`RandomExplorer` holds random composite actions (e.g. W+D with yaw-left) for random
  durations, biased forwards, and steers away from walls it sees close ahead in the depth buffer.
- :class:`StuckGuard` wraps any agent: when translation keys have been held for a while but the
  player has barely moved, it takes over and turns in place for a random while.
- :class:`RevisitAgent` explores outwards for half the clip, then retraces: the outbound poses
  played backwards in time are the reference that a closed-loop key controller tracks, so the
  return leg passes the outbound positions with the outbound yaws and sees those views again.
  Doom has momentum and collisions, so this is tracking, not an exact reversal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from data.actions import action_id_to_keys
from data.vizdoom.env import DEPTH_MAP_UNITS_PER_STEP

__all__ = [
    "AgentObs",
    "Agent",
    "ExplorerConfig",
    "RandomExplorer",
    "StuckGuardConfig",
    "StuckGuard",
    "RevisitConfig",
    "RevisitAgent",
    "ScriptedAgent",
    "keys_of",
    "free_space",
]

# Translation classes in data.actions order: 0 none, 1 W, 2 S, 3 D, 4 A, 5 W+D, 6 W+A, 7 S+D, 8 S+A.
# Rotation classes used here: 0 none, 1 yaw-right, 2 yaw-left (pitch is never pressed).
_FORWARD_CLASSES = (1, 5, 6)
_FRICTION = 0xE800 / 0x10000  # Doom keeps this fraction of the player's velocity every tic


def keys_of(translation: int, rotation: int) -> np.ndarray:
    """Held keys bool [8] of a translation class (0..8) and a rotation class (0..8)."""
    return action_id_to_keys(torch.tensor(9 * translation + rotation)).numpy()


@dataclass
class AgentObs:
    """What an agent sees before choosing the keys of the next frame."""

    frame: int  # index of the current frame in the recording
    position: np.ndarray  # float64 [3], eye in map units
    angle_deg: float  # Doom yaw, counter-clockwise from +x
    depth: np.ndarray | None = None  # uint8 [H, W] depth buffer, ~8 map units per step


class Agent(Protocol):
    """A policy over held keys; ``reset`` starts a new recording with its own random stream."""

    def reset(self, rng: np.random.Generator) -> None: ...

    def act(self, obs: AgentObs) -> np.ndarray: ...


def free_space(depth: np.ndarray, map_units_per_step: float = DEPTH_MAP_UNITS_PER_STEP) -> tuple[float, float, float]:
    """Free distance (map units) ahead, on the left and on the right, from a depth buffer uint8 [H, W].

    Looks at a band around the horizon row (the floor below it is far away), splits it into
    thirds and takes a low percentile so that a pillar in the way counts.
    """
    H, W = depth.shape
    band = depth[int(0.42 * H) : int(0.58 * H) + 1].astype(np.float32) * map_units_per_step
    thirds = np.array_split(band, 3, axis=1)
    left, ahead, right = (float(np.percentile(t, 10)) for t in thirds)
    return ahead, left, right


@dataclass
class ExplorerConfig:
    """Random composite actions, biased towards walking forwards."""

    hold_frames: tuple[int, int] = (8, 32)  # each action is held for U[lo, hi] frames
    # Weights of translation classes: none, W, S, D, A, W+D, W+A, S+D, S+A.
    translation_weights: tuple[float, ...] = (0.08, 0.40, 0.06, 0.06, 0.06, 0.14, 0.14, 0.03, 0.03)
    rotation_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # none, yaw-right, yaw-left
    near_wall_units: float = 128.0  # free space ahead (map units) below which a forward walker turns away
    avoid_frames: tuple[int, int] = (8, 20)  # how long an avoidance turn lasts at least


class RandomExplorer:
    """Random composite actions held for random durations; turns away from walls close ahead."""

    def __init__(self, cfg: ExplorerConfig = ExplorerConfig()):
        if len(cfg.translation_weights) != 9 or len(cfg.rotation_weights) != 3:
            raise ValueError("ExplorerConfig needs 9 translation weights and 3 rotation weights")
        self.cfg = cfg
        self._t = np.asarray(cfg.translation_weights, dtype=np.float64) / sum(cfg.translation_weights)
        self._r = np.asarray(cfg.rotation_weights, dtype=np.float64) / sum(cfg.rotation_weights)
        self.rng = np.random.default_rng(0)
        self._keys = keys_of(0, 0)
        self._left = 0
        self._avoiding = 0

    def reset(self, rng: np.random.Generator) -> None:
        self.rng, self._left, self._avoiding = rng, 0, 0

    def _new_action(self) -> None:
        lo, hi = self.cfg.hold_frames
        self._keys = keys_of(int(self.rng.choice(9, p=self._t)), int(self.rng.choice(3, p=self._r)))
        self._left = int(self.rng.integers(lo, hi + 1))

    def act(self, obs: AgentObs) -> np.ndarray:
        if self._avoiding > 0:
            self._avoiding -= 1
            return self._keys
        if obs.depth is not None and self._keys[0] and not self._keys[1]:
            ahead, left, right = free_space(obs.depth)
            if ahead < self.cfg.near_wall_units:  # walking into a wall: turn towards the open side
                rot = 2 if left > right else 1
                lo, hi = self.cfg.avoid_frames
                self._keys = keys_of(0, rot)
                self._avoiding = int(self.rng.integers(lo, hi + 1)) - 1
                self._left = 0
                return self._keys
        if self._left <= 0:
            self._new_action()
        self._left -= 1
        return self._keys


@dataclass
class StuckGuardConfig:
    """When held translation keys produce almost no motion, turn in place for a while."""

    window: int = 8  # frames of held translation to judge by
    min_progress: float = 0.2  # stuck if moved < this fraction of the full-speed distance over the window
    escape_frames: tuple[int, int] = (15, 40)  # frames of pure turning once stuck


class StuckGuard:
    """Wraps an agent; takes over with a pure yaw turn when the player is stuck against something.

    ``step_units`` is the full-speed distance per frame (map units), the yardstick for "no motion".
    ``escapes`` counts how often it took over since the last reset.
    """

    def __init__(self, inner: Agent, step_units: float, cfg: StuckGuardConfig = StuckGuardConfig()):
        if step_units <= 0:
            raise ValueError(f"step_units must be positive, got {step_units}")
        self.inner, self.step_units, self.cfg = inner, step_units, cfg
        self.rng = np.random.default_rng(0)
        self._hist: deque[tuple[np.ndarray, bool]] = deque(maxlen=cfg.window)
        self._escape = 0
        self._escape_keys = keys_of(0, 1)
        self.escapes = 0

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.inner.reset(rng)
        self._hist.clear()
        self._escape, self.escapes = 0, 0

    def act(self, obs: AgentObs) -> np.ndarray:
        pos = np.asarray(obs.position[:2], dtype=np.float64)
        if self._escape > 0:
            self._escape -= 1
            self._hist.clear()
            return self._escape_keys
        keys = self.inner.act(obs)
        # The window holds (position, translating?) for the last `window` frames: the motion from
        # the oldest position to this one is what those frames' keys produced.
        if len(self._hist) == self.cfg.window and all(moving for _, moving in self._hist):
            moved = float(np.linalg.norm(pos - self._hist[0][0]))
            if moved < self.cfg.min_progress * self.cfg.window * self.step_units:
                lo, hi = self.cfg.escape_frames
                self._escape_keys = keys_of(0, int(self.rng.integers(1, 3)))
                self._escape = int(self.rng.integers(lo, hi + 1)) - 1
                self.escapes += 1
                self._hist.clear()
                return self._escape_keys
        self._hist.append((pos, bool(keys[0] ^ keys[1] or keys[2] ^ keys[3])))
        return keys


@dataclass
class RevisitConfig:
    """Outbound exploration, then a time-reversed replay of the outbound poses, tracked with keys."""

    outbound_fraction: float = 0.5  # share of the clip spent exploring; the return takes as long
    pause_frames: int = 8  # the outbound leg ends standing still for this long, so the return starts at rest
    lookahead_frames: int = 4  # steer towards the reference this many frames ahead (Doom's momentum lags ~5)
    deadband_units: float = 1.5  # predicted position errors below this (map units) press no translation key
    sector_hysteresis_deg: float = 10.0  # keep the current walking direction until 22.5 + this off


# Translation classes by walking direction in the camera frame (deg clockwise from forward).
_SECTOR_CLASSES = {0: 1, 45: 5, 90: 3, 135: 7, 180: 2, 225: 8, 270: 4, 315: 6}
_CLASS_SECTORS = {c: a for a, c in _SECTOR_CLASSES.items()}


class RevisitAgent:
    """Explore for the first R frames, then retrace the outbound poses backwards in time.

    The outbound leg records its poses p_0..p_R and ends with ``pause_frames`` of standing still
    (reversing at full speed would lag the reference by the ~5 frames Doom needs to stop). The
    return leg targets the mirror image in time, p_{2R - t} at frame t, so it passes the outbound positions in reverse order *with the
    outbound yaws* (walking backwards through the views it saw) and is back at p_0 at frame 2R,
    then holds still. Yaw has no momentum in Doom, so the yaw keys reproduce the outbound turns
    exactly. Translation does have momentum (a release slides on), so it cannot be replayed:
    each frame the agent predicts where coasting would take it ``lookahead_frames`` ahead and
    presses the walking direction (one of eight, with hysteresis) towards the reference there.
    ``return_frame`` is R.
    """

    def __init__(self, explorer: Agent, num_frames: int, tics_per_frame: int, turn_step_deg: float, cfg: RevisitConfig = RevisitConfig()):
        if not 0.0 < cfg.outbound_fraction <= 0.5:
            raise ValueError(f"outbound_fraction must lie in (0, 0.5] so that the return fits, got {cfg.outbound_fraction}")
        self.explorer, self.cfg = explorer, cfg
        self.return_frame = max(1, int(cfg.outbound_fraction * (num_frames - 1)))
        self.tics_per_frame = tics_per_frame
        self.yaw_step = turn_step_deg  # yaw per frame while a yaw key is held
        n = cfg.lookahead_frames * tics_per_frame  # coasting n tics moves f (1 - f^n) / (1 - f) x speed per tic
        self._coast = _FRICTION * (1.0 - _FRICTION**n) / (1.0 - _FRICTION) / tics_per_frame
        self._wp: list[tuple[np.ndarray, float]] = []
        self._prev: np.ndarray | None = None
        self._cls = 0

    def reset(self, rng: np.random.Generator) -> None:
        self.explorer.reset(rng)
        self._wp, self._prev, self._cls = [], None, 0

    def act(self, obs: AgentObs) -> np.ndarray:
        pos = np.asarray(obs.position[:2], dtype=np.float64)
        vel = np.zeros(2) if self._prev is None else pos - self._prev
        self._prev = pos
        if obs.frame <= self.return_frame:
            self._wp.append((pos, float(obs.angle_deg)))
        if obs.frame < self.return_frame - self.cfg.pause_frames:
            return self.explorer.act(obs)
        if obs.frame < self.return_frame:
            return np.zeros(8, dtype=bool)
        return self._track(obs.frame, pos, vel, float(obs.angle_deg))

    def _reference(self, frame: int) -> tuple[np.ndarray, float]:
        return self._wp[max(0, 2 * self.return_frame - frame)]

    def _track(self, t: int, pos: np.ndarray, vel: np.ndarray, angle: float) -> np.ndarray:
        keys = np.zeros(8, dtype=bool)
        _, yaw_next = self._reference(t + 1)
        dyaw = (yaw_next - angle + 180.0) % 360.0 - 180.0
        keys[4], keys[5] = dyaw < -self.yaw_step / 2, dyaw > self.yaw_step / 2  # Doom angle grows to the left
        target, _ = self._reference(t + self.cfg.lookahead_frames)
        err = target - (pos + self._coast * vel)
        if np.linalg.norm(err) < self.cfg.deadband_units:
            self._cls = 0
        else:
            a = np.radians(angle)
            fwd = float(err @ np.array([np.cos(a), np.sin(a)]))
            right = float(err @ np.array([np.sin(a), -np.cos(a)]))
            heading = float(np.degrees(np.arctan2(right, fwd))) % 360.0
            keep = False
            if self._cls in _CLASS_SECTORS:
                off = abs((heading - _CLASS_SECTORS[self._cls] + 180.0) % 360.0 - 180.0)
                keep = off <= 22.5 + self.cfg.sector_hysteresis_deg
            if not keep:
                self._cls = _SECTOR_CLASSES[int(round(heading / 45.0)) % 8 * 45]
        keys[:4] = keys_of(self._cls, 0)[:4]
        return keys


class ScriptedAgent:
    """Plays a fixed key sequence bool [N, 8] (then repeats its last row); for tests and replays."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, dtype=bool)
        if self.keys.ndim != 2 or self.keys.shape[1] != 8 or len(self.keys) == 0:
            raise ValueError(f"scripted keys must be bool [N, 8] with N >= 1, got shape {self.keys.shape}")
        self._i = 0

    def reset(self, rng: np.random.Generator) -> None:
        self._i = 0

    def act(self, obs: AgentObs) -> np.ndarray:
        k = self.keys[min(self._i, len(self.keys) - 1)]
        self._i += 1
        return k
