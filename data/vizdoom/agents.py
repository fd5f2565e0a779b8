"""Agents that drive the ViZDoom player with held keys: explore, retrace a path, never stay stuck.

Every agent maps an observation (eye position, yaw, depth buffer) to the clip contract's held
keys bool [8] (W, S, D, A, yaw-right, yaw-left, pitch-up, pitch-down; pitch is never pressed).

- :class:`RandomExplorer` holds random composite actions (e.g. W+D with yaw-left) for random
  durations, biased forwards, and steers away from walls it sees close ahead in the depth buffer.
- :class:`StuckGuard` wraps any agent: when translation keys have been held for a while but the
  player has barely moved, it takes over and turns in place for a random while.
- :class:`RevisitAgent` explores outwards for part of the clip, then retraces: it steers back
  through the outbound poses in reverse order with a closed-loop key controller, matching both
  the position and the yaw of each outbound pose, so the return leg sees the outbound views again.
  Doom has momentum and collisions, so this is a tracking controller, not an exact reversal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from data.actions import action_id_to_keys

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
_SLIDE_FACTOR = 0xE800 / (0x10000 - 0xE800)  # distance slid after releasing keys = this x speed per tic (9.67)


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


def free_space(depth: np.ndarray, map_units_per_step: float = 8.0) -> tuple[float, float, float]:
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
    near_wall_units: float = 72.0  # free space ahead (map units) below which a forward walker turns away
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
    """Outbound exploration, then a closed-loop retrace of the outbound poses in reverse."""

    outbound_fraction: float = 0.45  # share of the clip's frames spent exploring outwards
    reach_units: float = 12.0  # an outbound pose counts as passed within this distance (map units) ...
    yaw_tolerance_deg: float = 3.0  # ... and this yaw error
    lookahead_units: float = 24.0  # walk towards the path point this far ahead (pure pursuit)
    turn_first_deg: float = 12.0  # with a larger yaw error, stop and turn in place (as the outbound leg did)
    sector_hysteresis_deg: float = 10.0  # keep the current walking direction until 45/2 + this off


# Translation classes by walking direction in the camera frame (deg clockwise from forward).
_SECTOR_CLASSES = {0: 1, 45: 5, 90: 3, 135: 7, 180: 2, 225: 8, 270: 4, 315: 6}
_CLASS_SECTORS = {c: a for a, c in _SECTOR_CLASSES.items()}


class RevisitAgent:
    """Explore for ``outbound_fraction`` of ``num_frames``, then retrace the outbound path backwards.

    The return leg walks the outbound positions in reverse while turning the camera to each
    outbound yaw, so it sees the outbound views again. It is a pure-pursuit controller over
    held keys: the progress index moves back along the path once a pose is matched (position
    within ``reach_units`` and yaw within ``yaw_tolerance_deg``); the yaw keys turn towards that
    pose's yaw; the translation keys are the one of the eight walking directions closest to the
    path point ``lookahead_units`` ahead (with hysteresis, so keys are held steadily rather than
    pulsed). Near the first pose it releases early enough for Doom's slide (``_SLIDE_FACTOR`` x
    speed per tic) to stop it there, then holds still. ``return_frame`` is the first return frame.
    """

    def __init__(self, explorer: Agent, num_frames: int, tics_per_frame: int, turn_step_deg: float, cfg: RevisitConfig = RevisitConfig()):
        if not 0.0 < cfg.outbound_fraction < 1.0:
            raise ValueError(f"outbound_fraction must lie in (0, 1), got {cfg.outbound_fraction}")
        self.explorer, self.cfg = explorer, cfg
        self.return_frame = max(1, int(round(cfg.outbound_fraction * (num_frames - 1))))
        self.tics_per_frame = tics_per_frame
        self.yaw_step = turn_step_deg  # yaw per frame while a yaw key is held
        self._wp: list[tuple[np.ndarray, float]] = []
        self._k = 0
        self._prev: np.ndarray | None = None
        self._cls = 0

    def reset(self, rng: np.random.Generator) -> None:
        self.explorer.reset(rng)
        self._wp, self._k, self._prev, self._cls = [], 0, None, 0

    def act(self, obs: AgentObs) -> np.ndarray:
        pos = np.asarray(obs.position[:2], dtype=np.float64)
        vel = np.zeros(2) if self._prev is None else pos - self._prev
        self._prev = pos
        if obs.frame < self.return_frame:
            self._wp.append((pos, float(obs.angle_deg)))
            self._k = len(self._wp) - 1
            return self.explorer.act(obs)
        return self._track(pos, vel, float(obs.angle_deg))

    def _yaw_error(self, k: int, angle: float) -> float:
        return (self._wp[k][1] - angle + 180.0) % 360.0 - 180.0

    def _track(self, pos: np.ndarray, vel: np.ndarray, angle: float) -> np.ndarray:
        cfg = self.cfg
        while self._k > 0 and np.linalg.norm(self._wp[self._k][0] - pos) < cfg.reach_units and abs(self._yaw_error(self._k, angle)) < cfg.yaw_tolerance_deg:
            self._k -= 1
        dyaw = self._yaw_error(self._k, angle)
        keys = np.zeros(8, dtype=bool)
        keys[4], keys[5] = dyaw < -self.yaw_step / 2, dyaw > self.yaw_step / 2  # Doom angle grows to the left
        if abs(dyaw) > cfg.turn_first_deg:
            self._cls = 0
            return keys
        j = self._k  # pursue the first path point at least lookahead_units away (or the start)
        while j > 0 and np.linalg.norm(self._wp[j][0] - pos) < cfg.lookahead_units:
            j -= 1
        err = self._wp[j][0] - pos
        dist = float(np.linalg.norm(err))
        speed_per_tic = float(np.linalg.norm(vel)) / self.tics_per_frame
        if j == 0 and dist < max(_SLIDE_FACTOR * speed_per_tic, cfg.reach_units / 3):
            self._cls = 0  # release: the slide carries the player to the start
        else:
            a = np.radians(angle)
            fwd = float(err @ np.array([np.cos(a), np.sin(a)]))
            right = float(err @ np.array([np.sin(a), -np.cos(a)]))
            heading = float(np.degrees(np.arctan2(right, fwd))) % 360.0
            if self._cls in _CLASS_SECTORS:
                off = abs((heading - _CLASS_SECTORS[self._cls] + 180.0) % 360.0 - 180.0)
                keep = off <= 22.5 + cfg.sector_hysteresis_deg
            else:
                keep = False
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
