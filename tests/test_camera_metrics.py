"""Two-view pose estimation on frames rendered with known cameras, and trajectory error invariances.

The scene is a ray-cast textured box room built here with numpy/OpenCV: the camera looks into a
corner with the floor in view, so three planes at different depths give real parallax.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from data.actions import MotionSteps, keys_to_poses
from data.geometry import make_intrinsics, make_pose, relative_pose, rotation_x, rotation_y
from eval.camera import PoseEstimatorConfig, camera_errors, estimate_relative_poses, estimate_trajectory, geodesic_deg

H, W = 120, 160
HALF = 2.5  # room half-size
K = make_intrinsics(75.0, W, H).double()


def _atlas(seed: int = 0, size: int = 256) -> np.ndarray:
    """Six wall textures [6, S, S, 3] uint8: multi-scale noise plus small rectangles and discs."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(6):
        coarse = cv2.resize(rng.random((size // 16, size // 16, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
        fine = cv2.resize(rng.random((size // 4, size // 4, 3)), (size, size), interpolation=cv2.INTER_LINEAR)
        img = np.ascontiguousarray((np.clip(0.6 * coarse + 0.4 * fine, 0, 1) * 255).astype(np.uint8))
        for _ in range(120):
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            x, y = (int(v) for v in rng.integers(0, size, 2))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), int(rng.integers(2, 8)), color, -1)
            else:
                w, h = (int(v) for v in rng.integers(3, 12, 2))
                cv2.rectangle(img, (x, y), (x + w, y + h), color, -1)
        tiles.append(img)
    return np.stack(tiles)


ATLAS = _atlas()


def _render(c2w: torch.Tensor, k: np.ndarray | None = None, hw: tuple[int, int] = (H, W)) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] and z-depth [H, W] of the box room seen from c2w (OpenCV camera, intrinsics k)."""
    H, W = hw  # noqa: N806
    c2w_np, k = c2w.numpy(), (K.numpy() if k is None else k)
    texels_per_unit = 48.0
    j, i = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    cam = np.stack([j, i, np.ones_like(i)], -1).reshape(-1, 3) @ np.linalg.inv(k).T  # z = 1 rays
    d = cam @ c2w_np[:3, :3].T
    o = c2w_np[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = np.concatenate([(HALF - o) / d, (-HALF - o) / d], axis=1)  # walls +x +y +z -x -y -z
    ts = np.where(ts > 0, ts, np.inf)
    wall, t = ts.argmin(1), ts.min(1)
    p = o + t[:, None] * d
    axis = wall % 3
    u = np.where(axis == 0, p[:, 1], p[:, 0])
    v = np.where(axis == 2, p[:, 1], p[:, 2])
    s = ATLAS.shape[1]
    mu = np.mod(u * texels_per_unit, s).astype(np.float32).reshape(H, W)
    mv = (np.mod(v * texels_per_unit, s) + wall * s).astype(np.float32).reshape(H, W)
    img = cv2.remap(ATLAS.reshape(-1, s, 3), mu, mv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return img, t.reshape(H, W)  # cam rays have z = 1, so the ray parameter is the z-depth


def _trajectory(steps: list[tuple[float, float, float, float]], start: torch.Tensor | None = None) -> torch.Tensor:
    """c2w [N+1, 4, 4] from per-step (dx, dz, yaw_deg, pitch_deg) motions in the current camera frame."""
    pose = start if start is not None else make_pose(rotation_y(45.0) @ rotation_x(-25.0), torch.zeros(3, dtype=torch.float64))
    poses = [pose]
    for dx, dz, yaw, pitch in steps:
        pose = pose @ make_pose(rotation_y(yaw) @ rotation_x(pitch), torch.tensor([dx, 0.0, dz], dtype=torch.float64))
        poses.append(pose)
    return torch.stack(poses)


def _video(c2w: torch.Tensor, k: np.ndarray | None = None, hw: tuple[int, int] = (H, W)) -> tuple[np.ndarray, np.ndarray]:
    out = [_render(p, k, hw) for p in c2w]
    return np.stack([f for f, _ in out]), np.stack([d for _, d in out])


# right; forward + yaw right; pure rotation; forward-right + yaw left + pitch up; back
STEPS = [(0.25, 0.0, 0.0, 0.0), (0.0, 0.3, 3.0, 0.0), (0.0, 0.0, 4.0, 2.0), (0.2, 0.2, -2.0, 1.0), (0.0, -0.2, 0.0, 0.0)]


@pytest.fixture(scope="module")
def scene() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    cv2.setNumThreads(1)
    c2w = _trajectory(STEPS)
    frames, depth = _video(c2w)
    return c2w, frames, depth


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.degrees(math.acos(float((a @ b / (a.norm() * b.norm())).clamp(-1, 1))))


def test_consecutive_poses_match_known_cameras(scene) -> None:
    c2w, frames, depth = scene
    est = estimate_relative_poses(frames, K, mode="consecutive")
    assert est.pairs.tolist() == [[i, i + 1] for i in range(len(STEPS))]
    assert est.ok.all(), est.reasons
    assert est.translated.tolist() == [True, True, False, True, True]
    for n in range(len(STEPS)):
        gt = relative_pose(c2w[n], c2w[n + 1])  # the convention the estimator must follow
        assert geodesic_deg(est.R[n] @ gt[:3, :3].T) < 0.5, n
        if est.translated[n]:
            assert _angle_deg(est.t_unit[n], gt[:3, 3]) < 5.0, n
            assert est.t_unit[n].norm().item() == pytest.approx(1.0)
            # baseline = |t| / median scene depth in the first camera
            expected = gt[:3, 3].norm().item() / float(np.median(depth[n]))
            assert est.baseline[n].item() == pytest.approx(expected, rel=0.3), n
        else:
            assert torch.equal(est.t_unit[n], torch.zeros(3, dtype=torch.float64)) and est.baseline[n] == 0
    # Explicit signs: step 0 moves right (+x), step 4 moves back (-z) in the camera frame.
    assert est.t_unit[0, 0] > 0.95 and est.t_unit[4, 2] < -0.95


def test_first_mode_gives_a_trajectory_matching_the_reference(scene) -> None:
    c2w, frames, _ = scene
    traj, est = estimate_trajectory(frames, K, mode="first")
    assert est.pairs.tolist() == [[0, j] for j in range(1, len(STEPS) + 1)]
    assert est.ok.all() and est.translated.all(), est.reasons
    assert torch.equal(traj[0], torch.eye(4, dtype=torch.float64))
    errs = camera_errors(traj, c2w)
    assert errs["num_frames"] == len(STEPS) and errs["reason"] == ""
    assert errs["R_dist_deg"] < 0.5 and errs["T_dist_rel"] < 0.1, errs
    # Chained consecutive estimates describe the same trajectory (translations in depth units).
    errs_c = camera_errors(estimate_trajectory(frames, K, mode="consecutive")[0], c2w)
    assert errs_c["R_dist_deg"] < 0.5 and errs_c["T_dist_rel"] < 0.15, errs_c


def test_pure_rotation_is_flagged_not_translated() -> None:
    # turn right; turn left and down; a small turn; stand still (a repeated frame)
    c2w = _trajectory([(0.0, 0.0, 3.0, 0.0), (0.0, 0.0, -2.0, -2.0), (0.0, 0.0, 0.5, 0.0), (0.0, 0.0, 0.0, 0.0)])
    frames, _ = _video(c2w)
    est = estimate_relative_poses(frames, K)
    assert est.ok.all() and not est.translated.any()
    assert (est.parallax_px < 0.5).all() and (est.baseline == 0).all()
    rel = est.relative_poses()
    for n in range(4):
        gt = relative_pose(c2w[n], c2w[n + 1])
        assert geodesic_deg(rel[n, :3, :3] @ gt[:3, :3].T) < 0.2
        assert torch.equal(rel[n, :3, 3], torch.zeros(3, dtype=torch.float64))


def test_degenerate_pairs_are_nan_with_a_reason(scene) -> None:
    c2w, frames, _ = scene
    video = frames[:3].copy()
    video[1] = 128  # a featureless frame
    est = estimate_relative_poses(video, K)
    assert est.ok.tolist() == [False, False]
    assert torch.isnan(est.R).all() and torch.isnan(est.t_unit).all() and torch.isnan(est.baseline).all()
    assert est.reasons[0].startswith("pair (0, 1): too few matches") and est.reasons[1].startswith("pair (1, 2)")
    traj = est.trajectory()
    assert torch.isnan(traj[1:]).all()
    errs = camera_errors(traj, c2w[:3])
    assert math.isnan(errs["R_dist_deg"]) and math.isnan(errs["T_dist"]) and "no finite estimated poses" in errs["reason"]
    # Unrelated frames (independent noise) match too little to give a pose.
    noise = np.random.default_rng(1).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    unrelated = estimate_relative_poses(noise, K)
    assert not unrelated.ok.any() and unrelated.reasons[0].startswith("pair (0, 1): ")
    # In 'first' mode, only the pair with the bad frame fails and the rest is still scored.
    first = estimate_relative_poses(video, K, mode="first")
    assert first.ok.tolist() == [False, True]
    errs = camera_errors(first.trajectory(), c2w[:3])
    assert errs["num_frames"] == 1 and "1 of 2 frames have no estimate" in errs["reason"]


def test_orb_features_also_work() -> None:
    # ORB keypoints have no sub-pixel refinement: it needs more pixels than SIFT for the same accuracy.
    k = make_intrinsics(75.0, 2 * W, 2 * H).double()
    c2w = _trajectory(STEPS[:2])
    frames, _ = _video(c2w, k.numpy(), (2 * H, 2 * W))
    est = estimate_relative_poses(frames, k, config=PoseEstimatorConfig(features="orb"))
    assert est.ok.all() and est.translated.all(), est.reasons
    for n in range(2):
        gt = relative_pose(c2w[n], c2w[n + 1])
        assert geodesic_deg(est.R[n] @ gt[:3, :3].T) < 1.0 and _angle_deg(est.t_unit[n], gt[:3, 3]) < 10.0


def test_estimator_rejects_bad_inputs(scene) -> None:
    _, frames, _ = scene
    with pytest.raises(ValueError, match=r"frames must be uint8 \[F, H, W, 3\]"):
        estimate_relative_poses(frames.astype(np.float32), K)
    with pytest.raises(ValueError, match="at least 2 frames"):
        estimate_relative_poses(frames[:1], K)
    with pytest.raises(ValueError, match=r"K must be \[3, 3\] or \[F=6, 3, 3\]"):
        estimate_relative_poses(frames, K[:2])
    with pytest.raises(ValueError, match="mode must be"):
        estimate_relative_poses(frames, K, mode="pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features must be"):
        estimate_relative_poses(frames, K, config=PoseEstimatorConfig(features="surf"))


# ---- trajectory errors --------------------------------------------------------------------------


def _reference(seed: int = 0, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(n, 8, generator=g) < 0.35
    start = make_pose(rotation_y(30.0), torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    return keys_to_poses(keys, MotionSteps(translation=0.1, rotation_deg=4.0), start)


def test_trajectory_against_itself_and_invariances() -> None:
    ref = _reference()
    same = camera_errors(ref, ref)
    assert same["R_dist_deg"] == pytest.approx(0.0, abs=1e-6) and same["T_dist"] == pytest.approx(0.0, abs=1e-12)
    assert same["scale"] == pytest.approx(1.0) and same["num_frames"] == 11 and same["reason"] == ""
    # A different world frame (any rigid G) and a different scale change nothing but the fitted scale.
    G = make_pose(rotation_x(20.0) @ rotation_y(-70.0), torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    est = G @ ref
    est[:, :3, 3] *= 3.7
    errs = camera_errors(est, ref)
    assert errs["R_dist_deg"] == pytest.approx(0.0, abs=1e-6) and errs["T_dist"] == pytest.approx(0.0, abs=1e-9)
    assert errs["scale"] == pytest.approx(1 / 3.7)
    # Without scale alignment the same estimate is penalised.
    assert camera_errors(est, ref, align_scale=False)["T_dist"] > 0.1


def test_known_rotation_and_translation_offsets() -> None:
    ref = _reference(1)
    # Every camera after the first turned by 7 degrees about its own axis: R error is exactly 7.
    est = ref.clone()
    est[1:] = ref[1:] @ make_pose(rotation_x(7.0), torch.zeros(3, dtype=torch.float64))
    errs = camera_errors(est, ref)
    assert errs["R_dist_deg"] == pytest.approx(7.0, abs=1e-9) and errs["T_dist"] == pytest.approx(0.0, abs=1e-9)
    # Every centre after the first shifted by 0.3 in the first camera's frame: T error is exactly 0.3.
    est = ref.clone()
    offset = ref[0, :3, :3] @ torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    est[1:, :3, 3] += offset
    errs = camera_errors(est, ref, align_scale=False)
    assert errs["T_dist"] == pytest.approx(0.3) and errs["R_dist_deg"] == pytest.approx(0.0, abs=1e-6)


def test_mirrored_trajectory_is_not_rescued_by_a_negative_scale() -> None:
    ref = _reference(2)
    ref = torch.linalg.inv(ref[:1]) @ ref  # first camera at the identity, so negating centres mirrors the path
    est = ref.clone()
    est[:, :3, 3] *= -1.0
    errs = camera_errors(est, ref)
    assert errs["scale"] == 0.0
    assert errs["T_dist_rel"] == pytest.approx(1.0)  # no better than standing still


def test_degenerate_estimates_and_bad_reference() -> None:
    ref = _reference(3, n=5)
    still = ref[:1].repeat(5, 1, 1)  # an estimate that never translates
    errs = camera_errors(still, ref)
    assert errs["scale"] == 1.0 and "does not translate" in errs["reason"] and math.isfinite(errs["T_dist"])
    nan_first = ref.clone()
    nan_first[0] = float("nan")
    assert "first estimated pose" in camera_errors(nan_first, ref)["reason"]
    bad = ref.clone()
    bad[2, :3, :3] *= 2.0
    with pytest.raises(ValueError, match=r"c2w_ref: frames \[2\] are not finite rigid"):
        camera_errors(ref, bad)
    with pytest.raises(ValueError, match="must both be"):
        camera_errors(ref[:3], ref)


def test_geodesic_angle_is_accurate_near_zero_and_180() -> None:
    for deg in (1e-5, 0.2, 90.0, 179.99):
        torch.testing.assert_close(geodesic_deg(rotation_y(deg)), torch.tensor(deg, dtype=torch.float64), atol=1e-9, rtol=1e-9)
