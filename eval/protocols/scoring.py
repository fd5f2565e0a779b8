"""Scoring helpers shared by the protocols, and the result every protocol returns.

- :func:`frame_scores`: PSNR (capped), SSIM and LPIPS per frame pair.
- :func:`camera_scores`: two-view poses of latent-rate frames chained into a trajectory and
  compared with the commanded one (``eval.camera``).
- :func:`action_scores`: WorldCompass action accuracy of latent-rate frames against the commanded
  keys (``eval.actions``), plus which steps matched.

Camera and action scores use one frame per latent, the last of its group: that is the frame whose
pose the model was given (``data.latents``), so every compared pose is known exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from data.actions import MotionSteps, MotionThresholds, group_class, keys_to_motion
from eval.actions import ActionAccuracyConfig, action_accuracy, step_classes
from eval.camera import PoseEstimatorConfig, camera_errors, estimate_relative_poses
from eval.lpips import LPIPS
from eval.metrics import psnr, ssim

__all__ = [
    "LPIPS_MIN_SIZE",
    "Example",
    "ProtocolResult",
    "frame_scores",
    "camera_scores",
    "action_scores",
    "nanmean",
    "bootstrap_interval",
    "summarize",
    "mean_curve",
]

LPIPS_MIN_SIZE = 31  # AlexNet's two stride-2 pools after its stride-4 conv leave nothing of smaller frames


@dataclass
class Example:
    """Frames to draw as a strip: ``top`` (reference) above ``bottom`` (generated), both uint8 [N, H, W, 3]."""

    title: str
    top: np.ndarray
    bottom: np.ndarray
    top_label: str = "ground truth"
    bottom_label: str = "generated"


@dataclass
class ProtocolResult:
    """What one protocol measured for one model.

    summary: headline numbers (NaN where not computable; ``notes`` say why), means over clips.
    intervals: metric -> (low, high) 95 % bootstrap interval of that mean over clips. curves: metric ->
    {"x": frame or step indices, "y": the mean over clips, "xlabel"}. clips: per-clip details
    (JSON-able). examples: strips for the report.
    """

    name: str
    summary: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    clips: list[dict[str, Any]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN if there are none)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values`` (NaN, NaN with fewer than 2).

    Clips are resampled with replacement ``resamples`` times from a fixed seed, so a report is
    reproducible; the interval narrows like 1/sqrt(number of clips).
    """
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(means, 95 % bootstrap intervals) over clips of each key of the per-clip ``rows``."""
    summary, intervals = {}, {}
    for k in keys:
        vals = [r.get(k, math.nan) for r in rows]
        summary[k] = nanmean(vals)
        intervals[k] = bootstrap_interval(vals)
    return summary, intervals


def mean_curve(rows: Sequence[tuple[Sequence[int], Sequence[float]]], xlabel: str) -> dict[str, Any]:
    """Per-index mean over clips of (x, y) rows whose x may differ: {"x", "y", "n", "xlabel"}."""
    table: dict[int, list[float]] = {}
    for xs, ys in rows:
        for x, y in zip(xs, ys):
            table.setdefault(int(x), []).append(float(y))
    xs = sorted(table)
    return {"x": xs, "y": [nanmean(table[x]) for x in xs], "n": [len(table[x]) for x in xs], "xlabel": xlabel}


def frame_scores(gen: np.ndarray, ref: np.ndarray, lpips: Optional[LPIPS], psnr_cap: float) -> dict[str, np.ndarray]:
    """Per-frame "psnr" (dB, capped at ``psnr_cap``), "ssim" and "lpips" (when LPIPS is available and the
    frames are at least ``LPIPS_MIN_SIZE`` pixels on each side).

    gen, ref: uint8 [N, H, W, 3]. Values are float64 [N].
    """
    if gen.shape != ref.shape:
        raise ValueError(f"generated frames {list(gen.shape)} and reference frames {list(ref.shape)} differ in shape")
    a, b = torch.from_numpy(np.ascontiguousarray(gen)), torch.from_numpy(np.ascontiguousarray(ref))
    out = {
        "psnr": psnr(a, b).clamp(max=psnr_cap).numpy(),
        "ssim": ssim(a, b).numpy(),
    }
    if lpips is not None and lpips.available and min(gen.shape[1:3]) >= LPIPS_MIN_SIZE:
        vals = []
        with torch.no_grad():
            for i in range(0, a.shape[0], 16):  # bounded memory at high resolution
                vals.append(lpips(a[i : i + 16], b[i : i + 16]).double().cpu())
        out["lpips"] = torch.cat(vals).numpy()
    return out


def camera_scores(
    frames: np.ndarray, K: Tensor, c2w: Tensor, mode: str = "consecutive", config: Optional[PoseEstimatorConfig] = None
) -> dict[str, Any]:
    """Camera errors of latent-rate frames uint8 [T, H, W, 3] against their commanded poses c2w [T, 4, 4].

    K: pixel intrinsics [3, 3] or [T, 3, 3]. Returns eval.camera.camera_errors' fields plus the
    number of pairs that could not be estimated.
    """
    if frames.shape[0] < 2:
        return {"R_dist_deg": math.nan, "T_dist": math.nan, "T_dist_rel": math.nan, "scale": math.nan,
                "num_frames": 0, "failed_pairs": 0, "reason": "fewer than 2 latent frames"}
    est = estimate_relative_poses(frames, K, mode, config)
    err = camera_errors(est.trajectory(), torch.as_tensor(c2w, dtype=torch.float64))
    failed = [r for r in est.reasons if r]
    reason = "; ".join(x for x in (err["reason"], failed[0] if failed else "") if x)
    return {**err, "failed_pairs": len(failed), "reason": reason}


def action_scores(
    frames: np.ndarray,
    K: Tensor,
    keys: Tensor,
    steps: MotionSteps,
    config: Optional[ActionAccuracyConfig] = None,
    estimator: Optional[PoseEstimatorConfig] = None,
) -> dict[str, Any]:
    """Action accuracy of latent-rate frames uint8 [T, H, W, 3] commanded by latent keys [T, 8] (keys[0] unused).

    Step n is the motion from latent n to n+1, estimated from consecutive frames and scored against
    keys[n + 1]; the commanded motions ``keys_to_motion(keys[1:], steps)`` set the translation scale.
    Returns eval.actions.action_accuracy's fields (without per_threshold) and ``step_hits``: bool
    per step, exact 81-class match at the chosen threshold.
    """
    cfg = config or ActionAccuracyConfig()
    keys = torch.as_tensor(keys).bool()
    if frames.shape[0] != keys.shape[0] or frames.shape[0] < 2:
        raise ValueError(f"action_scores: need T >= 2 latent frames and keys [T, 8], got {frames.shape[0]} and {list(keys.shape)}")
    est = estimate_relative_poses(frames, K, "consecutive", estimator)
    rel = est.relative_poses()
    res = action_accuracy(rel, keys[1:], cfg, reference=keys_to_motion(keys[1:], steps))
    hits = [False] * (keys.shape[0] - 1)
    if math.isfinite(res["threshold"]):
        scaled = rel.clone()
        scaled[:, :3, 3] *= res["scale"]
        rule = MotionThresholds(translation=res["threshold"], direction_deg=cfg.direction_deg, rotation_deg=cfg.rotation_deg)
        t_est, r_est = step_classes(scaled, rule)
        ok = torch.isfinite(rel).flatten(1).all(dim=1)
        ref_t, ref_r = group_class(keys[1:, :4]), group_class(keys[1:, 4:])
        hits = ((t_est == ref_t) & (r_est == ref_r) & ok).tolist()
    out = {k: v for k, v in res.items() if k != "per_threshold"}
    out["step_hits"] = hits
    return out
