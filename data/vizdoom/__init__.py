"""ViZDoom source: clips from a real game engine driven by real key presses (``python -m data.vizdoom``).

Modules: ``env`` (the headless engine, Doom -> OpenCV poses, intrinsics), ``agents`` (explorer,
stuck guard, revisit), ``record`` (rollouts into the clip contract, keys-vs-poses agreement).
Importing this package does not import ``vizdoom``; creating a :class:`DoomEnv` does.
"""

from data.vizdoom.env import DoomConfig, DoomEnv, doom_c2w, doom_intrinsics, plan_frames
from data.vizdoom.record import RecordConfig, key_agreement, pose_key_thresholds, record_clip

__all__ = [
    "DoomConfig",
    "DoomEnv",
    "doom_c2w",
    "doom_intrinsics",
    "plan_frames",
    "RecordConfig",
    "record_clip",
    "key_agreement",
    "pose_key_thresholds",
]
