"""Record ViZDoom clips in the clip contract, and check recorded keys against recorded poses.

A clip is F consecutive frames of one episode: frame 0 is the state after an unrecorded walk
(from the map start, or from the end of the episode's previous clip), so clips of one map start
in different places; ``keys[i]`` are the keys held from frame i-1 to frame i (``keys[0]``: those
held into frame 0); poses are rebased to frame 0. Up to ``clips_per_episode`` clips share an
episode (one map load). Clips in which the engine ends the episode (death on a damaging floor,
an exit line) or teleports the player are rejected and re-recorded in a new episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.actions import MotionThresholds, keys_to_action_id, poses_to_keys
from data.contract import validate_clip
from data.geometry import rebase_to_first
from data.latents import latent_keys_from_frames, latent_poses, num_latents
from data.vizdoom.agents import (
    Agent,
    AgentObs,
    ExplorerConfig,
    RandomExplorer,
    RevisitAgent,
    RevisitConfig,
    StuckGuard,
    StuckGuardConfig,
)
from data.vizdoom.env import DoomConfig, DoomEnv, DoomState, EpisodeEnded, doom_c2w, terminal_speed

__all__ = [
    "RecordConfig",
    "ClipRejected",
    "make_agent",
    "rollout",
    "record_clip",
    "record_clips",
    "pose_key_thresholds",
    "key_agreement",
    "clip_seed",
    "init_worker",
    "record_task",
]

TRAJECTORIES = ("random", "revisit", "mixed")


@dataclass
class RecordConfig:
    """What one clip is: its length, its trajectory kind, and how it starts."""

    num_frames: int = 65  # 1 + 4k frames group into whole latents of a stride-4 autoencoder
    trajectory: str = "mixed"  # random | revisit | mixed (each clip revisit with revisit_prob)
    revisit_prob: float = 0.5
    warmup_frames: tuple[int, int] = (0, 150)  # unrecorded exploration from the map start before a first clip
    gap_frames: tuple[int, int] = (8, 60)  # unrecorded exploration between clips of one episode
    clips_per_episode: int = 4  # clips recorded in one episode (the map loads once; ~0.1 s)
    max_attempts: int = 6  # rejected clips tolerated per episode before giving up
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)
    guard: StuckGuardConfig = field(default_factory=StuckGuardConfig)
    revisit: RevisitConfig = field(default_factory=RevisitConfig)


class ClipRejected(RuntimeError):
    """A clip that cannot be used (episode ended, teleport, pitch moved); carries the reason."""


def _step_units(env: DoomEnv) -> float:
    return terminal_speed(env.cfg.move_speed) * env.cfg.tics_per_frame


def make_agent(env: DoomEnv, kind: str, num_frames: int, cfg: RecordConfig) -> Agent:
    """The agent of one clip: a guarded random explorer, or a revisit agent around one."""
    explorer = StuckGuard(RandomExplorer(cfg.explorer), _step_units(env), cfg.guard)
    if kind == "random":
        return explorer
    if kind == "revisit":
        turn_step = env.cfg.turn_speed_deg * env.cfg.tics_per_frame
        return RevisitAgent(explorer, num_frames, env.cfg.tics_per_frame, turn_step, cfg.revisit)
    raise ValueError(f"trajectory kind must be 'random' or 'revisit', got {kind!r}")


def _obs(i: int, s: DoomState) -> AgentObs:
    return AgentObs(frame=i, position=s.position, angle_deg=s.angle_deg, depth=s.depth)


def rollout(env: DoomEnv, agent: Agent, num_frames: int, state: DoomState, first_keys: np.ndarray | None = None):
    """Run ``agent`` from ``state`` for ``num_frames`` frames (state is frame 0).

    Returns (states list[DoomState] of length F, keys bool [F, 8]). Raises :class:`ClipRejected`
    on a teleport (a jump no walking can make), a pitch change, or the end of the episode.
    """
    max_jump = 3.0 * _step_units(env) + 8.0  # map units per frame in the ground plane
    max_turn = env.cfg.turn_speed_deg * env.cfg.tics_per_frame + 0.5
    states = [state]
    keys = np.zeros((num_frames, 8), dtype=bool)
    if first_keys is not None:
        keys[0] = first_keys
    for i in range(1, num_frames):
        keys[i] = agent.act(_obs(i - 1, states[-1]))
        try:
            s = env.step(keys[i])
        except EpisodeEnded as e:
            raise ClipRejected(f"frame {i}: {e}") from e
        prev = states[-1]
        jump = float(np.linalg.norm(s.position[:2] - prev.position[:2]))
        turn = abs((s.angle_deg - prev.angle_deg + 180.0) % 360.0 - 180.0)
        if jump > max_jump or turn > max_turn:
            raise ClipRejected(f"frame {i}: camera jumped {jump:.1f} map units / {turn:.1f} deg (teleporter?)")
        if abs(s.pitch_deg) > 1e-3:
            raise ClipRejected(f"frame {i}: pitch {s.pitch_deg:.3f} deg; Doom pitch is a shear, not a rotation")
        states.append(s)
    return states, keys


def _build_clip(env: DoomEnv, states: list[DoomState], keys: np.ndarray, meta: dict) -> dict:
    pos = np.stack([s.position for s in states])
    ang = np.array([s.angle_deg for s in states])
    c2w = rebase_to_first(doom_c2w(pos, ang, env.cfg.map_units_per_unit))
    video = np.stack([env.plan.apply(s.rgb) for s in states])
    F = len(states)
    wad = env.wad_path.rsplit("/", 1)[-1].removesuffix(".wad")
    return {
        "video": video,
        "c2w": c2w.float().numpy(),
        "K": env.plan.K.float().expand(F, 3, 3).numpy().copy(),
        "keys": keys,
        "caption": f"First-person walk through level {env.map_name} of {wad}, rendered by the Doom engine.",
        "meta": {
            "source": "vizdoom",
            "scene": f"{wad}/{env.map_name}",
            "fps": env.fps,
            "units": f"1 unit = {env.cfg.map_units_per_unit:g} Doom map units",
            "origin": {"x": float(pos[0, 0]), "y": float(pos[0, 1]), "z": float(pos[0, 2]), "angle_deg": float(ang[0])},
            "tics_per_frame": env.cfg.tics_per_frame,
            "move_speed": env.cfg.move_speed,
            "turn_speed_deg": env.cfg.turn_speed_deg,
            "map_units_per_unit": env.cfg.map_units_per_unit,
            "render_size": list(env.plan.render_wh),
            "crop_tlhw": list(env.plan.crop),
            **meta,
        },
    }


def _revisit_meta(agent: RevisitAgent, states: list[DoomState]) -> dict:
    """How closely the return leg retraced the outbound poses (map units, degrees)."""
    R = agent.return_frame
    pos = np.stack([s.position for s in states])
    mirror = np.linalg.norm(pos[R : 2 * R + 1] - pos[R::-1][: len(pos) - R], axis=1)  # frame R+n vs frame R-n
    start, end = states[0], states[-1]
    return {
        "return_frame": R,
        "mirror_median_map_units": float(np.median(mirror)),
        "mirror_max_map_units": float(mirror.max()),
        "end_distance_map_units": float(np.linalg.norm(end.position - start.position)),
        "end_yaw_error_deg": float(abs((end.angle_deg - start.angle_deg + 180.0) % 360.0 - 180.0)),
        "farthest_map_units": float(np.linalg.norm(pos - pos[0], axis=1).max()),
    }


def record_clips(env: DoomEnv, cfg: RecordConfig, seed: int, count: int = 1) -> list[dict]:
    """Record ``count`` clips (the contract's dicts) in one episode from ``seed``.

    The first clip starts after a warm-up walk of U(warmup_frames) frames from the map's start,
    each later one after a further U(gap_frames) frames, so clips of one episode do not overlap
    and the map is loaded once. A rejected clip (death, exit, teleport) starts a new episode on a
    new map. Everything random derives from ``seed``: the result does not depend on the worker.
    """
    if cfg.trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {cfg.trajectory!r}")
    if cfg.num_frames < 2 or count < 1:
        raise ValueError(f"need num_frames >= 2 and count >= 1, got {cfg.num_frames} and {count}")
    clips: list[dict] = []
    reasons: list[str] = []
    state: DoomState | None = None
    last = np.zeros(8, dtype=bool)
    attempt = 0
    while len(clips) < count:
        if attempt >= cfg.max_attempts:
            raise ClipRejected(f"seed {seed}: {attempt} rejected clips: " + "; ".join(reasons))
        rng = np.random.default_rng([seed, len(clips), attempt])
        kind = cfg.trajectory if cfg.trajectory != "mixed" else ("revisit" if rng.random() < cfg.revisit_prob else "random")
        if state is None:
            state, last = env.reset(seed=int(rng.integers(2**31))), np.zeros(8, dtype=bool)
            lo, hi = cfg.warmup_frames
        else:
            lo, hi = cfg.gap_frames
        warm = int(rng.integers(lo, hi + 1))
        try:
            if warm > 0:
                walker = make_agent(env, "random", warm + 1, cfg)
                walker.reset(rng)
                states, wkeys = rollout(env, walker, warm + 1, state, first_keys=last)
                state, last = states[-1], wkeys[-1]
            agent = make_agent(env, kind, cfg.num_frames, cfg)
            agent.reset(rng)
            states, keys = rollout(env, agent, cfg.num_frames, state, first_keys=last)
        except ClipRejected as e:
            reasons.append(f"clip {len(clips)} attempt {attempt} on {env.map_name}: {e}")
            attempt, state = attempt + 1, None
            continue
        guard = agent.explorer if isinstance(agent, RevisitAgent) else agent
        meta = {"trajectory": kind, "seed": int(seed), "episode_clip": len(clips), "attempt": attempt,
                "warmup_frames": warm, "stuck_escapes": int(getattr(guard, "escapes", 0))}
        if isinstance(agent, RevisitAgent):
            meta["revisit"] = _revisit_meta(agent, states)
        clip = _build_clip(env, states, keys, meta)
        validate_clip(clip, f"vizdoom clip seed={seed} #{len(clips)}")
        clips.append(clip)
        state, last = states[-1], keys[-1]
    return clips


def record_clip(env: DoomEnv, cfg: RecordConfig, seed: int) -> dict:
    """Record one clip from ``seed`` in a fresh episode (see :func:`record_clips`)."""
    return record_clips(env, cfg, seed, 1)[0]


def pose_key_thresholds(
    env_cfg: DoomConfig, stride: int = 4, translation_fraction: float = 0.35, rotation_fraction: float = 0.5
) -> MotionThresholds:
    """Key-derivation thresholds scaled to this source: a fraction of the full-speed motion per latent.

    WorldPlay's fixed 0.01 units / 0.05 deg suit its 0.08-unit steps. Doom's momentum makes the
    player slide on after a release (66%, 30%, 14% of a full-speed latent's travel in the next
    three latents at the defaults) and start slowly after a press (34% in the first latent), so a
    threshold near a third of the full-speed travel ends a slide's reading as a held key after
    one latent. Over 40 recorded clips any fraction in 0.28..0.45 agreed within 1.5% (README).
    """
    per_latent = terminal_speed(env_cfg.move_speed) * env_cfg.tics_per_frame * stride / env_cfg.map_units_per_unit
    turn = env_cfg.turn_speed_deg * env_cfg.tics_per_frame * stride
    return MotionThresholds(translation=translation_fraction * per_latent, rotation_deg=rotation_fraction * turn)


def key_agreement(clip: dict, stride: int, thresholds: MotionThresholds) -> dict:
    """How often keys derived from poses agree with the pressed keys, per latent (latent 0 excluded).

    Pressed latent keys: a key counts if held in most frames of the latent's group
    (``latent_keys_from_frames``). Derived: ``poses_to_keys`` over latent poses. Uses the longest
    prefix of 1 + stride*k frames. Returns the fractions of latents whose 81-class action id,
    translation class and rotation class agree; ``steady``: the action agreement over latents
    pressing the same keys as the latent before (Doom's momentum makes the latent after a change
    lag); and the latent counts.
    """
    F = len(clip["keys"])
    F = 1 + stride * ((F - 1) // stride)
    if num_latents(F, stride) < 2:
        raise ValueError(f"clip too short for stride {stride}: {len(clip['keys'])} frames")
    keys = torch.as_tensor(np.asarray(clip["keys"][:F]))
    c2w = torch.as_tensor(np.asarray(clip["c2w"][:F])).double()
    pressed = keys_to_action_id(latent_keys_from_frames(keys, stride))[1:]
    derived = keys_to_action_id(poses_to_keys(latent_poses(c2w, stride), thresholds))[1:]
    same = pressed == derived
    held = pressed[1:] == pressed[:-1]
    return {
        "action": float(same.float().mean()),
        "translation": float((pressed // 9 == derived // 9).float().mean()),
        "rotation": float((pressed % 9 == derived % 9).float().mean()),
        "steady": float(same[1:][held].float().mean()) if bool(held.any()) else float("nan"),
        "latents": int(pressed.numel()),
        "steady_latents": int(held.sum()),
    }


def clip_seed(base_seed: int, index: int) -> int:
    """The seed of episode (or clip) ``index`` of a dataset recorded with ``base_seed``."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])


_WORKER: tuple[DoomEnv, RecordConfig] | None = None


def init_worker(env_cfg: DoomConfig, rec_cfg: RecordConfig, base_seed: int) -> None:
    """Start this process's engine (a multiprocessing Pool initializer)."""
    global _WORKER
    _WORKER = (DoomEnv(env_cfg, seed=base_seed), rec_cfg)


def record_task(task: tuple[int, int, int]) -> list[dict]:
    """Record the clips (first_index, count, seed) of one episode with this process's engine.

    Clip indices land in meta['clip_index'].
    """
    if _WORKER is None:
        raise RuntimeError("record_task needs init_worker first")
    first, count, seed = task
    clips = record_clips(_WORKER[0], _WORKER[1], seed, count)
    for j, clip in enumerate(clips):
        clip["meta"]["clip_index"] = first + j
    return clips
