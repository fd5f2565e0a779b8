"""Worldsmith inference: run any stage's bundle from an image and a camera path, streaming, with timings.

``WorldPlayer`` (interactive, chunk by chunk) and ``python -m infer`` (a whole trajectory to an mp4
and a JSON sidecar). Both are thin layers over ``models.rollout.Rollout``.
"""

from infer.config import PlayerConfig, VideoSettings
from infer.errors import InferError
from infer.player import ChunkTiming, WorldPlayer
from infer.trajectory import Trajectory, TrajectoryLengthError, load_trajectory

__all__ = [
    "ChunkTiming",
    "InferError",
    "PlayerConfig",
    "Trajectory",
    "TrajectoryLengthError",
    "VideoSettings",
    "WorldPlayer",
    "load_trajectory",
]
