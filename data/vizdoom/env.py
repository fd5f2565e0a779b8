"""ViZDoom engine: a headless Doom renderer driven by held keys, and its camera geometry.

Everything here is an engine fact, read from the engine and checked against rendered frames
(tests/test_vizdoom.py; the measurements are in data/README.md):

- **World.** Doom map coordinates: x east, y north, z up, in map units. ``CAMERA_ANGLE`` is the yaw
  in degrees counter-clockwise from +x seen from above. ``CAMERA_POSITION_*`` is the eye (feet +
  view height 41, including ZDoom's smoothing when stepping up stairs); view bob is switched off
  (``movebob 0``) so the eye does not bounce while walking.
- **Camera.** In OpenCV axes the camera's right, down and forward vectors in the world are
  ``(sin a, -cos a, 0)``, ``(0, 0, -1)`` and ``(cos a, sin a, 0)``: these are the columns of the
  c2w rotation (:func:`doom_c2w`). Turning right *decreases* the Doom angle.
- **Units.** Poses are in scene units of ``map_units_per_unit`` map units (64 by default: one
  Doom floor tile; the player is 56 map units tall, so one scene unit is roughly 2 m).
- **Pitch.** The software renderer looks up and down by shearing (moving the horizon row), which
  is a principal-point shift, not a camera rotation. We never press look keys and check that the
  pitch stays 0, so every recorded pose is a true pinhole camera with the intrinsics below.
- **Intrinsics.** The 90 deg horizontal FOV is defined for a 4:3 screen; ViZDoom 1.3 keeps the
  vertical FOV for every render size and scales the horizontal one with the true aspect ratio
  ("Hor+"): ``fx = 2H/3``, ``fy = 0.8H`` (tall pixels, fy = 1.2 fx), see :func:`doom_intrinsics`.
  Fitted to rendered frames at twelve sizes from 160x120 to 640x480: within 0.25% (fx), 0.5% (fy).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing.util import Finalize
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from data.transforms import crop_box, crop_resize_frames, crop_resize_intrinsics

__all__ = [
    "TICRATE",
    "FREEDOOM_MAPS",
    "DoomConfig",
    "DoomState",
    "EpisodeEnded",
    "DoomEnv",
    "doom_c2w",
    "doom_intrinsics",
    "render_resolutions",
    "choose_render_resolution",
    "FramePlan",
    "plan_frames",
    "terminal_speed",
]

TICRATE = 35  # Doom game tics per second
VIEW_FOV_DEG = 90.0
DOOM_PIXEL_ASPECT = 1.2  # fy / fx: Doom's pixels are 20% taller than wide
DEPTH_MAP_UNITS_PER_STEP = 8.0  # ViZDoom's 8-bit depth buffer: one step is ~8 map units (measured)
FREEDOOM_MAPS = {
    "freedoom2": tuple(f"MAP{i:02d}" for i in range(1, 33)),
    "freedoom1": tuple(f"E{e}M{m}" for e in range(1, 5) for m in range(1, 10)),
}
_RES_RE = re.compile(r"^RES_(\d+)X(\d+)$")
_DOOM_FRICTION = 0xE800 / 0x10000  # velocity kept per tic on normal floors


class EpisodeEnded(RuntimeError):
    """The Doom episode ended mid-clip (player died, map exit, engine timeout)."""


@dataclass
class DoomConfig:
    """How the engine renders and how held keys drive the player."""

    wad: str = "freedoom2"  # freedoom1 | freedoom2 (ship with vizdoom) or a path to an IWAD
    map: Optional[str] = None  # None: a random map of the WAD for every episode
    width: int = 320  # stored frame size (frames are rendered at a native size, cropped and resized)
    height: int = 240
    tics_per_frame: int = 2  # 35 / 2 = 17.5 frames per second
    move_speed: int = 4  # Doom forwardmove units per held key (walk 25, run 50); terminal speed = move_speed / 3 map units per tic
    turn_speed_deg: float = 0.75  # yaw per tic while a yaw key is held
    map_units_per_unit: float = 64.0  # scene unit = one Doom floor tile
    monsters: bool = False
    skill: int = 3  # 1..5, only matters with monsters
    square_pixels: bool = False  # crop so that stored frames have fx = fy (narrower view), else keep Doom's tall pixels
    depth: bool = True  # render the 8-bit depth buffer (agents steer with it; never stored as metric depth)


@dataclass
class DoomState:
    """One rendered game state: frame at the native render size and the camera that produced it."""

    rgb: np.ndarray  # uint8 [Hr, Wr, 3]
    depth: np.ndarray | None  # uint8 [Hr, Wr], ~8 map units per step, saturates at 255
    position: np.ndarray  # float64 [3], eye in map units
    angle_deg: float
    pitch_deg: float
    tic: int


def doom_c2w(position: Tensor | np.ndarray, angle_deg: Tensor | np.ndarray | float, map_units_per_unit: float = 64.0) -> Tensor:
    """Camera-to-world poses [..., 4, 4] (float64, OpenCV axes) of Doom eyes [..., 3] facing ``angle_deg`` [...]."""
    pos = torch.as_tensor(np.asarray(position), dtype=torch.float64)
    a = torch.as_tensor(np.asarray(angle_deg), dtype=torch.float64).expand(pos.shape[:-1]) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    z, o = torch.zeros_like(a), torch.ones_like(a)
    right = torch.stack([s, -c, z], dim=-1)
    down = torch.stack([z, z, -o], dim=-1)
    forward = torch.stack([c, s, z], dim=-1)
    out = torch.zeros(*pos.shape[:-1], 4, 4, dtype=torch.float64)
    out[..., :3, :3] = torch.stack([right, down, forward], dim=-1)
    out[..., :3, 3] = pos / map_units_per_unit
    out[..., 3, 3] = 1.0
    return out


def doom_intrinsics(width: int, height: int, fov_deg: float = VIEW_FOV_DEG) -> Tensor:
    """K [3, 3] (float64, pixels) of ViZDoom's software renderer at a native ``width`` x ``height``.

    ``fov_deg`` is the horizontal FOV of a 4:3 screen; other aspect ratios keep the vertical FOV
    and widen or narrow the horizontal one ("Hor+"), so ``fx = 2 H / (3 tan(fov/2))`` for every
    size. Doom draws tall pixels (its 320x200 mode was shown at 4:3), so ``fy = 1.2 fx``.
    At fov 90: fx = 2H/3, fy = 0.8H, vertical FOV 64.0 deg. Fitted to rendered frames (README).
    """
    if width < 1 or height < 1:
        raise ValueError(f"render size must be positive, got {width}x{height}")
    fx = 2.0 * height / (3.0 * math.tan(math.radians(fov_deg) / 2.0))
    fy = DOOM_PIXEL_ASPECT * fx
    return torch.tensor([[fx, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def render_resolutions() -> list[tuple[int, int]]:
    """Native (W, H) sizes ViZDoom can render (its ScreenResolution enum), smallest first."""
    import vizdoom as vzd

    out = []
    for name in dir(vzd.ScreenResolution):
        m = _RES_RE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return sorted(set(out), key=lambda wh: (wh[0] * wh[1], wh))


def choose_render_resolution(
    width: int, height: int, aspect: float | None = None, available: list[tuple[int, int]] | None = None
) -> tuple[int, int]:
    """The native size to render for a ``width`` x ``height`` output cropped at ``aspect`` (W/H, native pixels).

    The smallest (fastest) size whose centred crop needs no upsampling; if none is large enough,
    the largest.
    """
    if width < 8 or height < 8:
        raise ValueError(f"output size {width}x{height} is too small (need at least 8x8)")
    avail = available or render_resolutions()
    aspect = aspect or width / height

    def fits(wh: tuple[int, int]) -> bool:
        _, _, h, w = crop_box((wh[1], wh[0]), (1.0, aspect))  # only the aspect of dst_hw matters
        return w >= width and h >= height

    big = [wh for wh in avail if fits(wh)]
    if big:
        return min(big, key=lambda wh: (wh[0] * wh[1], wh))
    return max(avail, key=lambda wh: (wh[0] * wh[1], wh))


@dataclass(frozen=True)
class FramePlan:
    """Native render size, the centred crop taken from it, the output size and the output K."""

    render_wh: tuple[int, int]
    crop: tuple[int, int, int, int]  # top, left, h, w in native pixels (data.transforms.crop_box)
    out_wh: tuple[int, int]
    K: Tensor  # [3, 3] float64, pixels of the output frame

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Crop and resize one native frame uint8 [Hr, Wr, 3] to the output uint8 [H, W, 3]."""
        if rgb.shape[:2] != (self.render_wh[1], self.render_wh[0]):
            raise ValueError(f"frame has shape {rgb.shape[:2]}, expected native (H, W) = {(self.render_wh[1], self.render_wh[0])}")
        return crop_resize_frames(rgb, self.crop, (self.out_wh[1], self.out_wh[0]))


def plan_frames(
    width: int,
    height: int,
    square_pixels: bool = False,
    fov_deg: float = VIEW_FOV_DEG,
    render_wh: tuple[int, int] | None = None,
) -> FramePlan:
    """Plan rendering ``width`` x ``height`` frames: native size, centred crop, and the matching K.

    Framing is data.transforms' rule (largest centred window, resize, K follows). By default the
    window has the output's aspect in native pixels (widest view, fy = 1.2 fx); ``square_pixels``
    takes a 1.2x narrower window so that the resize undoes Doom's tall pixels (fx = fy).
    """
    native_aspect = (width / height) / (DOOM_PIXEL_ASPECT if square_pixels else 1.0)
    rw, rh = render_wh or choose_render_resolution(width, height, aspect=native_aspect)
    box = crop_box((rh, rw), (1.0, native_aspect))  # only the aspect of dst_hw matters to crop_box
    K = crop_resize_intrinsics(doom_intrinsics(rw, rh, fov_deg), box, (height, width))
    return FramePlan((rw, rh), box, (width, height), K)


def terminal_speed(move_speed: int) -> float:
    """Steady walking speed (map units per tic) of a held move key: thrust move_speed/32 per tic, friction 0.90625."""
    return (int(move_speed) * 2048 / 65536) / (1.0 - _DOOM_FRICTION)


@contextlib.contextmanager
def _working_directory(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _close_game(game: Any, workdir: str) -> None:
    game.close()
    shutil.rmtree(workdir, ignore_errors=True)


class DoomEnv:
    """A headless ViZDoom game stepped one frame (``tics_per_frame`` tics) at a time by held keys.

    Keys are the clip contract's bool [8] (W, S, D, A, yaw-right, yaw-left, pitch-up, pitch-down);
    pitch keys are rejected (see the module docstring). Movement uses ViZDoom's delta buttons, so
    a held key thrusts with ``move_speed`` and the engine's own momentum and collisions apply.
    """

    def __init__(self, cfg: DoomConfig, seed: int = 0):
        import vizdoom as vzd

        self.cfg = cfg
        self.plan = plan_frames(cfg.width, cfg.height, cfg.square_pixels)
        if cfg.tics_per_frame < 1:
            raise ValueError(f"tics_per_frame must be >= 1, got {cfg.tics_per_frame}")
        if int(cfg.move_speed) != cfg.move_speed or not 1 <= cfg.move_speed <= 50:
            raise ValueError(f"move_speed must be an integer in [1, 50] (Doom forwardmove units), got {cfg.move_speed}")
        self.wad_path = self._resolve_wad(cfg.wad)
        self.maps = FREEDOOM_MAPS.get(os.path.splitext(os.path.basename(self.wad_path))[0], ())
        if cfg.map is not None and self.maps and cfg.map.upper() not in self.maps:
            raise ValueError(f"map {cfg.map!r} is not in {os.path.basename(self.wad_path)}; known: {self.maps[0]}..{self.maps[-1]}")
        if cfg.map is None and not self.maps:
            raise ValueError(f"wad {cfg.wad!r} is not a Freedoom WAD: name its map with map=...")

        g = vzd.DoomGame()
        g.set_doom_game_path(self.wad_path)
        g.set_doom_map((cfg.map or self.maps[0]).upper())
        rw, rh = self.plan.render_wh
        g.set_screen_resolution(getattr(vzd.ScreenResolution, f"RES_{rw}X{rh}"))
        g.set_screen_format(vzd.ScreenFormat.RGB24)
        g.set_window_visible(False)  # a visible window without a display crashes
        g.set_sound_enabled(False)
        g.set_depth_buffer_enabled(cfg.depth)
        for setter in (g.set_render_hud, g.set_render_weapon, g.set_render_crosshair, g.set_render_messages,
                       g.set_render_screen_flashes, g.set_render_decals, g.set_render_particles):
            setter(False)
        g.set_render_corpses(True)
        B, GV = vzd.Button, vzd.GameVariable
        g.set_available_buttons([B.MOVE_FORWARD_BACKWARD_DELTA, B.MOVE_LEFT_RIGHT_DELTA, B.TURN_LEFT_RIGHT_DELTA])
        g.set_available_game_variables(
            [GV.CAMERA_POSITION_X, GV.CAMERA_POSITION_Y, GV.CAMERA_POSITION_Z, GV.CAMERA_ANGLE, GV.CAMERA_PITCH, GV.CAMERA_FOV]
        )
        g.set_episode_timeout(0)
        g.set_episode_start_time(1)
        g.set_doom_skill(cfg.skill)
        g.set_mode(vzd.Mode.PLAYER)
        g.set_seed(int(seed) % (2**31))
        args = "+movebob 0 +stillbob 0"
        if not cfg.monsters:
            args += " -nomonsters"
        g.add_game_args(args)
        # The engine writes ./_vizdoom.ini, ./_vizdoom/ and crash logs into its working directory:
        # start it inside a private temporary directory, removed on close.
        self._workdir = tempfile.mkdtemp(prefix="worldsmith-vizdoom-")
        g.set_doom_config_path(os.path.join(self._workdir, "_vizdoom.ini"))
        try:
            with _working_directory(self._workdir):
                g.init()
        except Exception:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.game = g
        # Closed when garbage-collected, on close(), or at exit, including in multiprocessing
        # workers (which skip atexit): otherwise the engine process outlives its parent.
        self._closer = Finalize(self, _close_game, args=(g, self._workdir), exitpriority=10)

    @staticmethod
    def _resolve_wad(wad: str) -> str:
        import vizdoom as vzd

        if os.path.isfile(wad):
            return os.path.abspath(wad)
        path = os.path.join(os.path.dirname(vzd.__file__), f"{wad}.wad")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"wad {wad!r}: neither a file nor a WAD shipped with vizdoom ({path})")
        return path

    @property
    def fps(self) -> float:
        return TICRATE / self.cfg.tics_per_frame

    def keys_to_buttons(self, keys: np.ndarray) -> list[float]:
        """ViZDoom delta-button values [forward, right, turn-right] for held keys bool [8]."""
        k = np.asarray(keys, dtype=bool)
        if k.shape != (8,):
            raise ValueError(f"keys must be bool [8], got shape {k.shape}")
        if k[6] or k[7]:
            raise ValueError("pitch keys are not supported: Doom's renderer shears instead of rotating the camera")
        s, t = float(self.cfg.move_speed), float(self.cfg.turn_speed_deg)
        return [s * (int(k[0]) - int(k[1])), s * (int(k[2]) - int(k[3])), t * (int(k[4]) - int(k[5]))]

    def _state(self) -> DoomState:
        g = self.game
        if g.is_episode_finished() or g.is_player_dead():
            raise EpisodeEnded("player died" if g.is_player_dead() else "episode finished (map exit or timeout)")
        s = g.get_state()
        v = np.asarray(s.game_variables, dtype=np.float64)
        return DoomState(
            rgb=s.screen_buffer,
            depth=s.depth_buffer if self.cfg.depth else None,
            position=v[:3].copy(),
            angle_deg=float(v[3]),
            pitch_deg=float(v[4]),
            tic=int(s.tic),
        )

    def reset(self, map_name: str | None = None, seed: int | None = None, settle_tics: int = 10) -> DoomState:
        """Start a new episode on ``map_name`` (config map, else random by seed); returns the first state.

        The engine ignores input for the first few tics of an episode, so ``settle_tics`` no-op
        tics run before the first returned state.
        """
        rng = np.random.default_rng(seed)
        name = map_name or self.cfg.map or str(rng.choice(self.maps))
        if seed is not None:
            self.game.set_seed(int(seed) % (2**31))
        self.game.set_doom_map(name.upper())
        self.game.new_episode()
        self.map_name = name.upper()
        self.game.make_action([0.0, 0.0, 0.0], settle_tics)
        return self._state()

    def step(self, keys: np.ndarray) -> DoomState:
        """Hold ``keys`` bool [8] for one frame (``tics_per_frame`` tics) and return the new state."""
        self.game.make_action(self.keys_to_buttons(keys), self.cfg.tics_per_frame)
        return self._state()

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "DoomEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
