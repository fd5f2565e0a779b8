"""Action accuracy (WorldCompass): does the camera motion seen in a video follow the commanded keys?

Estimated relative poses are turned back into held keys with ``data.actions.motion_to_keys`` (the
same rule that labels training data) and compared with the commanded keys, step by step:

- ``action_acc``: exact match of the 81-class action id (9 * translation + rotation);
- ``fine_action_acc``: mean of the translation-class and rotation-class accuracies.

A step counts as moving when its translation norm exceeds a threshold. Translations of a video
have no absolute scale, so several thresholds are tried ({0.002, 0.005, 0.01} by default) and the
best is kept, as WorldCompass does. Thresholds apply to the translations as given (two-view
estimates from ``eval.camera`` are in units of median scene depth), or, when reference motions are
passed, after one least-squares scale maps the estimated translations onto the reference ones.
Definitions: ``eval/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionThresholds, group_class, motion_to_keys
from eval.camera import fit_scale

__all__ = ["ActionAccuracyConfig", "step_classes", "action_accuracy"]


@dataclass
class ActionAccuracyConfig:
    """Thresholds of the pose -> key rule used for scoring (WorldCompass defaults)."""

    translation_thresholds: list[float] = field(default_factory=lambda: [0.002, 0.005, 0.01])
    rotation_deg: float = 0.2  # minimum |yaw| or |pitch| per step
    direction_deg: float = 60.0  # cone around +z / +x that counts as forward / right (data.actions)
    select_by: str = "fine"  # which accuracy picks the threshold: "fine" or "exact"
    failed_as_wrong: bool = True  # steps without a pose estimate count as mismatches (else they are skipped)


def step_classes(rel: Tensor, thresholds: MotionThresholds) -> tuple[Tensor, Tensor]:
    """Translation and rotation 9-class ids [N] of relative motions rel [N, 4, 4] under ``thresholds``."""
    keys = motion_to_keys(rel.double(), thresholds)
    return group_class(keys[..., :4]), group_class(keys[..., 4:])


def _nan_result(reason: str, num_steps: int = 0) -> dict:
    return {
        "action_acc": math.nan,
        "fine_action_acc": math.nan,
        "translation_acc": math.nan,
        "rotation_acc": math.nan,
        "threshold": math.nan,
        "scale": math.nan,
        "num_steps": num_steps,
        "num_failed": num_steps,
        "per_threshold": [],
        "reason": reason,
    }


def action_accuracy(
    rel_est: Tensor,
    keys: Tensor,
    config: ActionAccuracyConfig | None = None,
    reference: Tensor | None = None,
) -> dict:
    """Score estimated step motions rel_est [N, 4, 4] against commanded keys [N, 8].

    Step n is the motion from frame n to n+1 in frame n's camera (``TwoViewPoses.relative_poses()``
    in consecutive mode); for a clip whose ``keys`` [F, 8] follow the contract (keys[i] = motion
    into frame i), pass ``keys[1:]``. ``reference`` [N, 4, 4] (optional) gives the commanded or
    ground-truth step motions; it only sets the scale of the estimated translations.
    Returns plain floats (fractions in [0, 1]) and the chosen threshold; NaN with a reason when
    nothing can be scored.
    """
    cfg = config or ActionAccuracyConfig()
    rel = torch.as_tensor(rel_est).double()
    keys = torch.as_tensor(keys)
    if rel.ndim != 3 or rel.shape[-2:] != (4, 4):
        raise ValueError(f"rel_est must be [N, 4, 4], got {tuple(rel.shape)}")
    if keys.shape != (rel.shape[0], NUM_KEYS):
        raise ValueError(f"keys must be [N={rel.shape[0]}, {NUM_KEYS}] to match rel_est, got {tuple(keys.shape)}")
    if reference is not None and torch.as_tensor(reference).shape != rel.shape:
        got = tuple(torch.as_tensor(reference).shape)
        raise ValueError(f"reference must be [N, 4, 4] like rel_est {tuple(rel.shape)}, got {got}")
    if not cfg.translation_thresholds:
        raise ValueError("ActionAccuracyConfig.translation_thresholds must not be empty")
    if cfg.select_by not in ("fine", "exact"):
        raise ValueError(f"ActionAccuracyConfig.select_by must be 'fine' or 'exact', got {cfg.select_by!r}")
    n = rel.shape[0]
    if n == 0:
        return _nan_result("no steps to score")
    ok = torch.isfinite(rel).flatten(1).all(dim=1)
    if not ok.any():
        return _nan_result(f"no step has a pose estimate ({n} steps)", n)
    reasons = []
    if not ok.all():
        reasons.append(f"{int((~ok).sum())} of {n} steps have no pose estimate")

    scale = 1.0
    if reference is not None:
        ref = torch.as_tensor(reference).double()
        scale = fit_scale(rel[ok, :3, 3], ref[ok, :3, 3])
        if math.isnan(scale):
            scale = 1.0
            reasons.append("estimated steps do not translate: scale not fitted")
    rel = rel.clone()
    rel[:, :3, 3] *= scale

    keys = keys.bool()
    ref_t, ref_r = group_class(keys[:, :4]), group_class(keys[:, 4:])
    scored = torch.ones(n, dtype=torch.bool) if cfg.failed_as_wrong else ok
    per_threshold = []
    for thr in cfg.translation_thresholds:
        rule = MotionThresholds(translation=thr, direction_deg=cfg.direction_deg, rotation_deg=cfg.rotation_deg)
        est_t, est_r = step_classes(rel, rule)
        hit_t = (est_t == ref_t) & ok
        hit_r = (est_r == ref_r) & ok
        t_acc = float(hit_t[scored].double().mean())
        r_acc = float(hit_r[scored].double().mean())
        per_threshold.append(
            {
                "threshold": float(thr),
                "action_acc": float((hit_t & hit_r)[scored].double().mean()),
                "fine_action_acc": 0.5 * (t_acc + r_acc),
                "translation_acc": t_acc,
                "rotation_acc": r_acc,
            }
        )
    key = "fine_action_acc" if cfg.select_by == "fine" else "action_acc"
    best = max(per_threshold, key=lambda row: row[key])  # ties keep the earliest threshold
    return {
        **best,
        "scale": scale,
        "num_steps": int(scored.sum()),
        "num_failed": int((~ok).sum()),
        "per_threshold": per_threshold,
        "reason": "; ".join(reasons),
    }
