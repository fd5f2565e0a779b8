"""WorldCompass action accuracy: perfect motions, flipped rotations, thresholds, scale, failures."""

from __future__ import annotations

import math

import pytest
import torch

from data.actions import MotionSteps, action_id_to_keys, group_class, keys_to_motion, keys_to_poses
from data.geometry import relative_pose
from eval.actions import ActionAccuracyConfig, action_accuracy

PER_FRAME = MotionSteps(translation=0.02, rotation_deg=0.75)  # WorldPlay's 0.08 / 3 deg per latent of 4 frames


def _all_actions(repeats: int = 2) -> torch.Tensor:
    """Keys [81 * repeats, 8] covering every action id, shuffled."""
    ids = torch.arange(81).repeat(repeats)
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    return action_id_to_keys(ids)


def test_perfect_motions_score_100_percent() -> None:
    keys = _all_actions()
    res = action_accuracy(keys_to_motion(keys, PER_FRAME), keys)
    assert res["action_acc"] == 1.0 and res["fine_action_acc"] == 1.0
    assert res["num_steps"] == 162 and res["num_failed"] == 0 and res["reason"] == "" and res["scale"] == 1.0
    # The same through integrated poses, with the contract's clip keys (step 0 holds none).
    clip_keys = torch.cat([torch.zeros(1, 8, dtype=torch.bool), keys])
    c2w = keys_to_poses(clip_keys, PER_FRAME)
    rel = relative_pose(c2w[:-1], c2w[1:])
    assert action_accuracy(rel, clip_keys[1:])["action_acc"] == 1.0


def test_opposing_keys_count_as_none() -> None:
    keys = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    rel = keys_to_motion(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool), PER_FRAME)
    assert action_accuracy(rel, keys)["action_acc"] == 1.0


def test_flipped_rotations_break_rotation_accuracy_only() -> None:
    keys = _all_actions()
    rel = keys_to_motion(keys, PER_FRAME)
    flipped = rel.clone()
    flipped[:, :3, :3] = rel[:, :3, :3].transpose(-1, -2)  # yaw right <-> left, pitch up <-> down
    res = action_accuracy(flipped, keys)
    no_rotation = float((group_class(keys[:, 4:]) == 0).double().mean())  # 1/9 of the steps
    assert res["translation_acc"] == 1.0
    assert res["rotation_acc"] == pytest.approx(no_rotation)
    assert res["action_acc"] == pytest.approx(no_rotation)
    assert res["fine_action_acc"] == pytest.approx(0.5 * (1.0 + no_rotation))


def test_translation_thresholds_try_each_and_keep_the_best() -> None:
    keys = _all_actions()
    slow = keys_to_motion(keys, MotionSteps(translation=0.003, rotation_deg=0.75))  # diagonals: 0.0042
    moving = float((group_class(keys[:, :4]) != 0).double().mean())
    only_high = action_accuracy(slow, keys, ActionAccuracyConfig(translation_thresholds=[0.005, 0.01]))
    assert only_high["translation_acc"] == pytest.approx(1.0 - moving)  # every move is read as standing still
    res = action_accuracy(slow, keys)
    assert res["threshold"] == 0.002 and res["translation_acc"] == 1.0
    rows = {row["threshold"]: row for row in res["per_threshold"]}
    assert list(rows) == [0.002, 0.005, 0.01]
    assert rows[0.005]["translation_acc"] == pytest.approx(1.0 - moving) and rows[0.01] == {**rows[0.005], "threshold": 0.01}
    # Too fast for nothing: with a large step every threshold works and the first is kept on ties.
    assert action_accuracy(keys_to_motion(keys, PER_FRAME), keys)["threshold"] == 0.002


def test_rotation_threshold_and_direction_cone() -> None:
    keys = _all_actions()
    slow_turn = keys_to_motion(keys, MotionSteps(translation=0.02, rotation_deg=0.15))
    turning = float((group_class(keys[:, 4:]) != 0).double().mean())
    assert action_accuracy(slow_turn, keys)["rotation_acc"] == pytest.approx(1.0 - turning)  # below 0.2 deg
    assert action_accuracy(slow_turn, keys, ActionAccuracyConfig(rotation_deg=0.1))["rotation_acc"] == 1.0
    # A translation tilted 50 deg from +z (towards -y, so 90 deg from x) still counts as forward
    # (60 deg cone); tilted 70 deg it counts as nothing.
    fwd = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for deg, expected in ((50.0, 1.0), (70.0, 0.0)):
        rel = torch.eye(4, dtype=torch.float64).unsqueeze(0).clone()
        rel[0, 1, 3], rel[0, 2, 3] = -0.02 * math.sin(math.radians(deg)), 0.02 * math.cos(math.radians(deg))
        assert action_accuracy(rel, fwd)["translation_acc"] == expected


def test_reference_motion_sets_the_translation_scale() -> None:
    keys = _all_actions()
    true = keys_to_motion(keys, PER_FRAME)
    tiny = true.clone()
    tiny[:, :3, 3] *= 0.01  # 0.0002 per step: under every threshold
    assert action_accuracy(tiny, keys)["translation_acc"] < 0.2
    res = action_accuracy(tiny, keys, reference=true)
    assert res["scale"] == pytest.approx(100.0) and res["action_acc"] == 1.0
    # Two-view style: unit-norm translation on every moving step, zero when only turning.
    unit = true.clone()
    t = unit[:, :3, 3]
    unit[:, :3, 3] = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    assert action_accuracy(unit, keys, reference=true)["action_acc"] == 1.0


def test_failed_steps_count_as_wrong_by_default() -> None:
    keys = _all_actions()
    rel = keys_to_motion(keys, PER_FRAME)
    rel[:12] = float("nan")
    res = action_accuracy(rel, keys)
    assert res["action_acc"] == pytest.approx(150 / 162) and res["num_failed"] == 12 and res["num_steps"] == 162
    assert "12 of 162 steps have no pose estimate" in res["reason"]
    skipped = action_accuracy(rel, keys, ActionAccuracyConfig(failed_as_wrong=False))
    assert skipped["action_acc"] == 1.0 and skipped["num_steps"] == 150
    rel[:] = float("nan")
    res = action_accuracy(rel, keys)
    assert math.isnan(res["action_acc"]) and math.isnan(res["fine_action_acc"])
    assert "no step has a pose estimate" in res["reason"]


def test_select_by_exact_or_fine() -> None:
    # Step 0: W + yaw-right, moving 0.004. Steps 1-2: no keys, drifting 0.003 (step 1 also turns).
    keys = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0], [0] * 8, [0] * 8], dtype=torch.bool)
    moved = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    rel = keys_to_motion(moved, MotionSteps(0.004, 1.0))
    rel[1:, 2, 3] = 0.003
    cfg = {"translation_thresholds": [0.002, 0.005]}
    # 0.002: exact 1/3, fine (1/3 + 2/3) / 2;  0.005: exact 1/3, fine (2/3 + 2/3) / 2.
    fine = action_accuracy(rel, keys, ActionAccuracyConfig(**cfg))
    assert fine["threshold"] == 0.005 and fine["fine_action_acc"] == pytest.approx(2 / 3)
    assert fine["action_acc"] == pytest.approx(1 / 3)
    exact = action_accuracy(rel, keys, ActionAccuracyConfig(**cfg, select_by="exact"))
    assert exact["threshold"] == 0.002 and exact["fine_action_acc"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="select_by"):
        action_accuracy(rel, keys, ActionAccuracyConfig(select_by="best"))


def test_bad_inputs_raise() -> None:
    keys = _all_actions(1)
    rel = keys_to_motion(keys, PER_FRAME)
    with pytest.raises(ValueError, match=r"keys must be \[N=81, 8\] to match rel_est, got \(80, 8\)"):
        action_accuracy(rel, keys[1:])
    with pytest.raises(ValueError, match=r"rel_est must be \[N, 4, 4\]"):
        action_accuracy(rel[:, :3], keys)
    with pytest.raises(ValueError, match="translation_thresholds must not be empty"):
        action_accuracy(rel, keys, ActionAccuracyConfig(translation_thresholds=[]))
    assert "no steps" in action_accuracy(rel[:0], keys[:0])["reason"]
