"""Typed configuration of the evaluation protocols (registered with Hydra by the lead).

``ProtocolConfig`` is what ``python -m eval`` and the training hook run with; ``WalkConfig`` says
how the ``long`` and ``action`` protocols draw their random composite action sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eval.actions import ActionAccuracyConfig
from eval.camera import PoseEstimatorConfig
from eval.lpips import LPIPSConfig

__all__ = ["PROTOCOLS", "WalkConfig", "ProtocolConfig"]

PROTOCOLS = ("short", "long", "action", "control")


@dataclass
class WalkConfig:
    """Random composite actions (WorldCompass's mixture), held for segments of several latents.

    Categories: ``move`` (a translation key, or a diagonal pair with ``diagonal_prob``), ``rotate``
    (yaw, or pitch with ``pitch_prob``), ``move_rotate`` (both), ``rotate_rotate`` (yaw + pitch),
    ``still``. Pitch keeps the view within ``max_pitch_deg`` of the start camera's horizon. Used for
    clips without a synthetic scene; synthetic clips use the data package's own planner.
    """

    segment_min: int = 2  # latents a sampled action is held for, at least ...
    segment_max: int = 8  # ... and at most (WorldCompass: 2-16)
    w_move: float = 0.25
    w_rotate: float = 0.25
    w_move_rotate: float = 0.30
    w_rotate_rotate: float = 0.10
    w_still: float = 0.10
    diagonal_prob: float = 0.2
    pitch_prob: float = 0.25
    max_pitch_deg: float = 15.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not 1 <= self.segment_min <= self.segment_max:
            raise ValueError(f"WalkConfig: need 1 <= segment_min <= segment_max, got {self.segment_min}, {self.segment_max}")
        weights = (self.w_move, self.w_rotate, self.w_move_rotate, self.w_rotate_rotate, self.w_still)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"WalkConfig: category weights must be >= 0 with a positive sum, got {weights}")
        for name in ("diagonal_prob", "pitch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WalkConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.max_pitch_deg < 0:
            raise ValueError(f"WalkConfig.max_pitch_deg must be >= 0, got {self.max_pitch_deg}")


@dataclass
class ProtocolConfig:
    """How the protocols run: which clips, how long, how generated video is scored."""

    num: int = 8  # clips per protocol (the first ``num`` clips of the data directory)
    seed: int = 0  # sampling noise and random action sequences; clip i uses seed + i
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | bf16: the DiT's weights (autoencoder and metrics stay fp32)
    steps: Optional[int] = None  # override the bundle's denoising steps (euler schedule)
    batch: int = 8  # clips per batched rollout (each clip keeps its own seed, so results do not depend on it)
    short_latents: int = 16  # short protocol length (WorldPlay: 61 frames = 16 latents at stride 4), capped by the clip
    long_latents: Optional[int] = None  # None: long_window_multiple x the training window (bundle meta data.num_latents)
    long_window_multiple: int = 4
    action_latents: int = 32  # WorldCompass's shortest horizon: 125 frames = 32 latents at stride 4
    control_latents: int = 16  # control protocol path length (latents)
    control_attempts: int = 4  # draws of the second path, keeping the one whose truth differs most from the first's
    control_separation_psnr: float = 15.0  # stop drawing once the two true videos are this far apart (PSNR, dB)
    pose_mode: str = "consecutive"  # eval.camera pair mode for camera errors: consecutive (chained) | first
    psnr_cap: float = 100.0  # per-frame PSNR is capped here before averaging (identical frames are +inf)
    scene_match_psnr: float = 30.0  # a scene seed must re-render a clip's first frame at least this well
    num_examples: int = 1  # clips per protocol drawn as PNG strips
    strip_frames: int = 8  # frames per strip
    walk: WalkConfig = field(default_factory=WalkConfig)
    estimator: PoseEstimatorConfig = field(default_factory=PoseEstimatorConfig)
    actions: ActionAccuracyConfig = field(default_factory=ActionAccuracyConfig)
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.num < 1:
            raise ValueError(f"ProtocolConfig.num must be >= 1, got {self.num}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"ProtocolConfig.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"ProtocolConfig.batch must be >= 1, got {self.batch}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"ProtocolConfig.steps must be >= 1, got {self.steps}")
        for name in ("short_latents", "action_latents", "control_latents", "control_attempts", "long_window_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProtocolConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.long_latents is not None and self.long_latents < 3:
            raise ValueError(f"ProtocolConfig.long_latents must be >= 3 (out, turn, back), got {self.long_latents}")
        if self.pose_mode not in ("consecutive", "first"):
            raise ValueError(f"ProtocolConfig.pose_mode must be 'consecutive' or 'first', got {self.pose_mode!r}")
        if self.psnr_cap <= 0:
            raise ValueError(f"ProtocolConfig.psnr_cap must be > 0, got {self.psnr_cap}")
        if self.num_examples < 0 or self.strip_frames < 1:
            raise ValueError(f"ProtocolConfig: num_examples >= 0 and strip_frames >= 1, got {self.num_examples}, {self.strip_frames}")
        self.walk.validate()
