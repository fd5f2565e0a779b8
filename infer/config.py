"""Player settings: the runtime choices (``PlayerConfig``) and what a bundle records about its video.

A bundle's ``sampling`` section is a :class:`models.rollout.RolloutConfig` (steps, schedule,
guidance, memory, mode, ...) plus keys that describe the video the model was trained to make
(:data:`VIDEO_KEYS`). The trainer exports ``height``, ``width`` and ``model_type``; the rest are
optional, with the defaults below. Any other key is an error naming it, so a misspelt key in a
hand-edited bundle never goes unnoticed.

======================== ======================================================= ==================
key                      meaning                                                 default
======================== ======================================================= ==================
height, width            training resolution (pixels); the video is made at it   required*
fps                      frame rate of the written mp4                           16 (the data's)
model_type               "ar" | "bidirectional" (bidirectional forces window)    from ``mode``
translation_step         pose-string step per latent (scene units)               0.08 (WorldPlay)
rotation_step_deg        pose-string rotation per latent (degrees)               3.0 (WorldPlay)
translation_threshold    motion -> action id thresholds, as in training          0.01
rotation_threshold_deg                                                           0.05
fov_x_deg                horizontal FOV of the camera when no K is given         WorldPlay's K
negative_prompt          prompt of the unconditional branch under guidance       none (no tokens)
======================== ======================================================= ==================

\\* ``PlayerConfig.height/width`` (``--height/--width``) override them or stand in when missing.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from data.actions import MotionSteps, MotionThresholds
from infer.errors import InferError
from models.rollout import RolloutConfig
from models.sampling import VIDEO_KEYS, split_sampling

__all__ = ["PlayerConfig", "VideoSettings", "VIDEO_KEYS", "resolve_settings", "available_cpus", "default_threads"]

DEFAULT_FPS = 16.0


@dataclass
class PlayerConfig:
    """How a bundle is run. ``None`` fields keep the bundle's defaults (``sampling`` section)."""

    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | bf16: the DiT's weights (the autoencoder / text encoder keep their own)
    offload: bool = False  # keep the text encoder and autoencoder on CPU, moving them to the device only to run
    seed: int = 0  # default seed of reset()
    decode_overlap: int = 4  # earlier latents re-decoded per chunk by an autoencoder without a streaming decoder; >= 1
    steps: Optional[int] = None  # Euler steps (euler schedule)
    schedule: Optional[str] = None  # euler | distilled
    shift: Optional[float] = None
    guidance: Optional[float] = None
    height: Optional[int] = None  # video size; required when the bundle does not record it
    width: Optional[int] = None
    fps: Optional[float] = None
    negative_prompt: Optional[str] = None
    weights: str = "model"  # model: what the bundle runs (its EMA where kept) | raw: model_raw.safetensors (the trained weights)
    # A LoRA adapter directory (<run>/export/adapter) folded into the bundle's model.safetensors (the base the LoRA run
    # started from); ``weights`` then picks the adapter: adapter.safetensors (model) or adapter_raw.safetensors (raw).
    adapter: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise InferError(f"PlayerConfig.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.weights not in ("model", "raw"):
            raise InferError(f"PlayerConfig.weights must be 'model' or 'raw', got {self.weights!r}")
        if self.decode_overlap < 1:
            raise InferError(f"PlayerConfig.decode_overlap must be >= 1, got {self.decode_overlap}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InferError(f"PlayerConfig.{name} must be >= 1, got {v}")
        if self.fps is not None and not self.fps > 0:
            raise InferError(f"PlayerConfig.fps must be > 0, got {self.fps}")


@dataclass
class VideoSettings:
    """What the bundle (plus overrides) says about the video: size, rate, motion units, camera, prompt."""

    height: int
    width: int
    fps: float = DEFAULT_FPS
    model_type: Optional[str] = None
    steps: MotionSteps = field(default_factory=MotionSteps)
    thresholds: MotionThresholds = field(default_factory=MotionThresholds)
    fov_x_deg: Optional[float] = None
    negative_prompt: Optional[str] = None
    sources: dict[str, str] = field(default_factory=dict)  # field -> "bundle" | "override" | "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_settings(sampling: Mapping[str, Any], cfg: PlayerConfig, where: str) -> tuple[RolloutConfig, VideoSettings]:
    """The rollout config and video settings of a bundle's ``sampling`` section with ``cfg``'s overrides.

    ``where`` names the bundle in errors. Raises InferError on unknown keys, missing resolution,
    bad values or motion steps that the action thresholds would not register.
    """
    try:
        rcfg, video = split_sampling(sampling, where)
    except ValueError as e:
        raise InferError(str(e)) from None

    sources: dict[str, str] = {}

    def pick(name: str, override: Any, default: Any) -> Any:
        if override is not None:
            sources[name] = "override"
            return override
        if video.get(name) is not None:
            sources[name] = "bundle"
            return video[name]
        sources[name] = "default"
        return default

    height = pick("height", cfg.height, None)
    width = pick("width", cfg.width, None)
    if height is None or width is None:
        raise InferError(
            f"{where}: the bundle does not record its video size (sampling.height / sampling.width); "
            f"pass --height and --width (PlayerConfig.height/width)"
        )
    fps = float(pick("fps", cfg.fps, DEFAULT_FPS))
    model_type = video.get("model_type")
    if model_type == "bidirectional" and rcfg.mode != "window":
        warnings.warn(
            f"{where}: a bidirectional model with sampling.mode={rcfg.mode!r}; running it in window mode "
            f"(window_latents={rcfg.window_latents}), the only mode that matches its full attention",
            stacklevel=2,
        )
        rcfg = replace(rcfg, mode="window")
        sources["mode"] = "model_type"
    steps = MotionSteps(float(video.get("translation_step", MotionSteps.translation)),
                        float(video.get("rotation_step_deg", MotionSteps.rotation_deg)))
    thresholds = MotionThresholds(
        translation=float(video.get("translation_threshold", MotionThresholds.translation)),
        rotation_deg=float(video.get("rotation_threshold_deg", MotionThresholds.rotation_deg)),
    )
    if not (steps.translation > thresholds.translation and steps.rotation_deg > thresholds.rotation_deg):
        raise InferError(
            f"{where}: pose-string steps ({steps.translation} units, {steps.rotation_deg} deg) must exceed the action "
            f"thresholds ({thresholds.translation}, {thresholds.rotation_deg} deg), or held keys would map to action 0"
        )
    settings = VideoSettings(
        height=int(height), width=int(width), fps=fps, model_type=model_type, steps=steps, thresholds=thresholds,
        fov_x_deg=None if video.get("fov_x_deg") is None else float(video["fov_x_deg"]),
        negative_prompt=pick("negative_prompt", cfg.negative_prompt, None), sources=sources,
    )
    if settings.height < 1 or settings.width < 1 or not settings.fps > 0:
        raise InferError(f"{where}: bad video settings height={settings.height} width={settings.width} fps={settings.fps}")

    changes = {k: getattr(cfg, k) for k in ("steps", "schedule", "shift", "guidance") if getattr(cfg, k) is not None}
    if changes.get("steps") is not None and (changes.get("schedule") or rcfg.schedule) == "distilled" and changes["steps"] != 4:
        raise InferError(
            f"{where}: the distilled schedule always takes 4 steps; --steps {changes['steps']} needs --schedule euler"
        )
    if changes:
        try:
            rcfg = replace(rcfg, **changes)
        except ValueError as e:
            raise InferError(f"{where}: {e}") from None
        sources.update({k: "override" for k in changes})
    return rcfg, settings


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    import math
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads() -> int:
    """CPU threads for inference when none are asked for: the available CPUs that are not busy.

    torch's default (every core) oversubscribes a shared machine: its threads wait on each other
    whenever one is descheduled (measured: CPU inference of the demo bundle at 0.9 frames/s with the
    default 2 threads on a busy 2-core machine, 14.1 with one). So: available CPUs minus the 1-minute
    load average (other processes' running threads), at least 1. ``--threads`` sets it explicitly.
    """
    import os

    n = available_cpus()
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, n - busy)
