"""Camera poses from video (two-view geometry with OpenCV) and trajectory errors against a reference.

``estimate_relative_poses`` matches local features between frame pairs and recovers the relative
pose from the essential matrix. Results follow ``data.geometry``: OpenCV cameras and the pose of
the second camera expressed in the first camera's frame (``relative_pose(c2w_i, c2w_j)``).

Two-view translation has no scale. We report its unit direction plus ``baseline``: |t| divided by
the median depth of the matched points in the first camera. That ratio is scale-free, so the
steps of one clip share a common unit (the scene depth) and can be chained into a trajectory and
aligned to a reference with one scale factor. A pair whose matches are explained by a rotation
alone (median rotation-compensated motion below ``min_parallax_px``) has no measurable
translation: it is kept with ``translated=False``, t = 0. A pair that cannot be estimated at all
is NaN with a reason. Definitions of the errors: ``eval/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

from data.geometry import is_rigid, make_pose, rebase_to_first

__all__ = [
    "PoseEstimatorConfig",
    "TwoViewPoses",
    "estimate_relative_poses",
    "estimate_trajectory",
    "geodesic_deg",
    "fit_scale",
    "camera_errors",
]

PairMode = Literal["consecutive", "first"]


@dataclass
class PoseEstimatorConfig:
    """Feature matching and robust two-view estimation settings."""

    features: str = "sift"  # "sift" or "orb" (both ship with opencv-python-headless 5)
    max_features: int = 4000
    ratio: float = 0.75  # Lowe ratio test on the two nearest descriptors
    min_matches: int = 15  # fewer matches (or inliers) than this: the pair fails
    ransac_px: float = 1.0  # RANSAC threshold in pixels (epipolar distance for E, reprojection for H)
    confidence: float = 0.999
    min_parallax_px: float = 0.5  # rotation-only model residual below this: no measurable translation
    # When feature matching cannot estimate a pair (small or smooth generated frames give few keypoints),
    # retry with dense optical flow: correspondences on a pixel grid, kept where the forward and backward
    # flows agree. "none" reports such pairs as failed.
    fallback: str = "flow"
    flow_grid: int = 2  # grid spacing of the flow correspondences (pixels)
    flow_consistency_px: float = 0.5  # forward-backward disagreement above this drops a correspondence
    min_flow_fraction: float = 0.15  # share of textured grid points that must pass (unrelated noise frames: ~0.09; real pairs: 0.13-1.0)


@dataclass
class TwoViewPoses:
    """Relative poses of N frame pairs (i, j); all tensors float64 except masks and counts.

    R [N, 3, 3] and t_unit [N, 3] describe camera j in camera i's frame (``relative_pose`` convention);
    ``baseline`` [N] is |t| / median scene depth in camera i, so ``t_unit * baseline`` is a
    translation in units of scene depth. Failed pairs are NaN with ``ok`` False and a reason.
    """

    mode: str
    pairs: Tensor  # [N, 2] int64 frame indices (i, j)
    R: Tensor  # [N, 3, 3]
    t_unit: Tensor  # [N, 3]; zero where not translated
    baseline: Tensor  # [N]; zero where not translated
    ok: Tensor  # [N] bool: the pair was estimated
    translated: Tensor  # [N] bool: parallax was measurable, t_unit is meaningful
    parallax_px: Tensor  # [N] median rotation-compensated motion of inlier matches
    inliers: Tensor  # [N] int64
    reasons: list[str]  # "" where ok

    def relative_poses(self) -> Tensor:
        """[N, 4, 4] relative poses with translations in units of scene depth (NaN where failed)."""
        return make_pose(self.R, self.t_unit * self.baseline.unsqueeze(-1))

    def trajectory(self) -> Tensor:
        """c2w [N + 1, 4, 4] with the first camera at the identity: chained (consecutive) or direct (first).

        In consecutive mode a failed step makes every later pose NaN.
        """
        rel = self.relative_poses()
        eye = torch.eye(4, dtype=torch.float64).unsqueeze(0)
        if self.mode == "first":
            return torch.cat([eye, rel])
        poses = [eye[0]]
        for step in rel:  # sequential by nature: each pose composes on the last
            poses.append(poses[-1] @ step)
        return torch.stack(poses)


def _as_numpy_frames(frames: Tensor | np.ndarray) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(f"frames: need at least 2 frames, got {arr.shape[0]}")
    return arr


def _as_numpy_intrinsics(K: Tensor | np.ndarray, num_frames: int) -> np.ndarray:
    k = K.detach().cpu().double().numpy() if isinstance(K, Tensor) else np.asarray(K, dtype=np.float64)
    if k.shape == (3, 3):
        k = np.broadcast_to(k, (num_frames, 3, 3))
    if k.shape != (num_frames, 3, 3):
        raise ValueError(f"K must be [3, 3] or [F={num_frames}, 3, 3], got {tuple(k.shape)}")
    if not np.isfinite(k).all() or (k[:, 0, 0] <= 0).any() or (k[:, 1, 1] <= 0).any():
        raise ValueError("K: intrinsics must be finite with positive focal lengths")
    return k


def _detector(cfg: PoseEstimatorConfig) -> tuple[cv2.Feature2D, int]:
    if cfg.fallback not in ("flow", "none"):
        raise ValueError(f"PoseEstimatorConfig.fallback must be 'flow' or 'none', got {cfg.fallback!r}")
    if cfg.features == "sift":
        return cv2.SIFT_create(nfeatures=cfg.max_features), cv2.NORM_L2
    if cfg.features == "orb":
        return cv2.ORB_create(nfeatures=cfg.max_features), cv2.NORM_HAMMING
    raise ValueError(f"PoseEstimatorConfig.features must be 'sift' or 'orb', got {cfg.features!r}")


def _detect(frame: np.ndarray, det: cv2.Feature2D) -> tuple[np.ndarray, np.ndarray | None]:
    """Keypoints [M, 2] in our pixel convention (centres at +0.5) and their descriptors."""
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    kps, desc = det.detectAndCompute(gray, None)
    pts = np.array([kp.pt for kp in kps], dtype=np.float64).reshape(-1, 2) + 0.5  # OpenCV puts centres at integers
    return pts, desc


def _match(d1: np.ndarray | None, d2: np.ndarray | None, norm: int, ratio: float) -> np.ndarray:
    """Index pairs [M, 2] passing the ratio test."""
    if d1 is None or d2 is None or len(d1) < 2 or len(d2) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    knn = cv2.BFMatcher(norm).knnMatch(d1, d2, k=2)
    good = [(m[0].queryIdx, m[0].trainIdx) for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    return np.array(good, dtype=np.int64).reshape(-1, 2)


def _flow_matches(f1: np.ndarray, f2: np.ndarray, cfg: PoseEstimatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Dense-flow correspondences (p1, p2) [M, 2] in our pixel convention between frames uint8 [H, W, 3].

    Farneback flow both ways; a grid point is kept where it lies on texture in both frames (the flow is
    defined there), following the flow forward then backward returns within ``flow_consistency_px``, and
    both ends look alike (grey levels within 12). Unless ``min_flow_fraction`` of the textured points pass,
    there are no correspondences: unrelated frames do not move as one scene.
    """
    g1 = cv2.cvtColor(np.ascontiguousarray(f1), cv2.COLOR_RGB2GRAY)
    g2 = cv2.cvtColor(np.ascontiguousarray(f2), cv2.COLOR_RGB2GRAY)
    H, W = g1.shape
    levels = max(1, min(4, int(np.log2(min(H, W) / 8))))
    args = (None, 0.5, levels, max(5, min(15, min(H, W) // 8)), 3, 5, 1.1, 0)
    fwd = cv2.calcOpticalFlowFarneback(g1, g2, *args)
    bwd = cv2.calcOpticalFlowFarneback(g2, g1, *args)
    ys, xs = np.mgrid[0:H:cfg.flow_grid, 0:W:cfg.flow_grid]
    ys, xs = ys.ravel(), xs.ravel()
    d = fwd[ys, xs]
    x2, y2 = xs + d[:, 0], ys + d[:, 1]
    inside = (x2 >= 0) & (x2 <= W - 1) & (y2 >= 0) & (y2 <= H - 1)
    back = bwd[np.clip(np.round(y2).astype(int), 0, H - 1), np.clip(np.round(x2).astype(int), 0, W - 1)]
    consistent = np.linalg.norm(d + back, axis=1) < cfg.flow_consistency_px
    def gradient(g: np.ndarray) -> np.ndarray:
        return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))

    # texture at the point in frame 1 and where it lands in frame 2: flow into a featureless area is a guess
    textured = (gradient(g1)[ys, xs] > 8.0) & (gradient(g2)[np.clip(np.round(y2).astype(int), 0, H - 1),
                                                           np.clip(np.round(x2).astype(int), 0, W - 1)] > 8.0)
    # photometric check: the two ends of a correspondence look alike (flow through noise is smooth but wrong)
    b1, b2 = g1.astype(np.float32), g2.astype(np.float32)
    same = np.abs(b1[ys, xs] - cv2.remap(b2, x2.astype(np.float32)[:, None], y2.astype(np.float32)[:, None],
                                         cv2.INTER_LINEAR)[:, 0]) < 12.0
    keep = inside & consistent & textured & same
    if keep.sum() < cfg.min_flow_fraction * max(1, int((gradient(g1)[ys, xs] > 8.0).sum())):
        keep[:] = False  # most of the texture does not follow one flow: unrelated frames, not a camera motion
    p1 = np.stack([xs[keep], ys[keep]], axis=1).astype(np.float64) + 0.5
    return p1, p1 + d[keep].astype(np.float64)


def _normalized(pts: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels [M, 2] -> normalised image coordinates [M, 2] (K^-1 applied)."""
    homo = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.linalg.inv(K).T
    return homo[:, :2] / homo[:, 2:]


def _rays(x: np.ndarray) -> np.ndarray:
    r = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def _kabsch(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Rotation R minimising sum |b2 - R b1|^2 over unit rays [M, 3]."""
    u, _, vt = np.linalg.svd(b2.T @ b1)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _rotation_residual(R: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Distance [M] (normalised units) between x2 and x1 moved by rotation R alone (points at infinity)."""
    p = np.concatenate([x1, np.ones((len(x1), 1))], axis=1) @ R.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.linalg.norm(p[:, :2] / p[:, 2:] - x2, axis=1)


def _triangulate_depths(R: np.ndarray, t: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depths [M] of each match in both cameras for X2 = R X1 + t (least-squares ray intersection)."""
    d1 = np.concatenate([x1, np.ones((len(x1), 1))], axis=1)
    d2 = np.concatenate([x2, np.ones((len(x2), 1))], axis=1)
    a = d1 @ R.T  # lambda1 * a - lambda2 * d2 = -t
    aa, ab, bb = (a * a).sum(1), (a * d2).sum(1), (d2 * d2).sum(1)
    at, bt = a @ t, d2 @ t
    det = aa * bb - ab * ab
    with np.errstate(divide="ignore", invalid="ignore"):
        lam1 = (-at * bb + ab * bt) / det
        lam2 = (ab * -at + aa * bt) / det
    return lam1, lam2


def _pose_from_essential(E: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cheirality-checked (R, t, in_front mask, depth in camera 1) among E's four decompositions."""
    R1, R2, t = cv2.decomposeEssentialMat(E)
    best = None
    for R in (R1, R2):
        for s in (1.0, -1.0):
            tt = s * t.ravel()
            z1, z2 = _triangulate_depths(R, tt, x1, x2)
            front = np.isfinite(z1) & np.isfinite(z2) & (z1 > 0) & (z2 > 0)
            if best is None or front.sum() > best[2].sum():
                best = (R, tt, front, z1)
    assert best is not None
    return best


def _two_view(p1: np.ndarray, p2: np.ndarray, K1: np.ndarray, K2: np.ndarray, cfg: PoseEstimatorConfig) -> dict:
    """Relative pose of one matched pair in OpenCV form (X2 = R X1 + t) plus diagnostics, or a failure reason."""
    try:
        return _solve_two_view(p1, p2, K1, K2, cfg)
    except (cv2.error, np.linalg.LinAlgError) as err:  # degenerate point sets can trip OpenCV's solvers
        return {"reason": f"two-view solver failed: {str(err).strip().splitlines()[-1]}"}


def _solve_two_view(p1: np.ndarray, p2: np.ndarray, K1: np.ndarray, K2: np.ndarray, cfg: PoseEstimatorConfig) -> dict:
    n = len(p1)
    if n < cfg.min_matches:
        return {"reason": f"too few matches ({n} < {cfg.min_matches})"}
    x1, x2 = _normalized(p1, K1), _normalized(p2, K2)
    focal = float(np.mean([K1[0, 0], K1[1, 1], K2[0, 0], K2[1, 1]]))
    thr = cfg.ransac_px / focal
    E, emask = cv2.findEssentialMat(x1, x2, np.eye(3), method=cv2.USAC_ACCURATE, prob=cfg.confidence, threshold=thr)
    emask = np.zeros(n, bool) if emask is None else emask.ravel().astype(bool)
    H, hmask = cv2.findHomography(x1, x2, cv2.RANSAC, thr, confidence=cfg.confidence)
    hmask = np.zeros(n, bool) if hmask is None else hmask.ravel().astype(bool)

    # Rotation-only model, fitted on the homography's inliers and scored on every consistent match.
    if hmask.sum() >= cfg.min_matches:
        R_rot = _kabsch(_rays(x1[hmask]), _rays(x2[hmask]))
        support = hmask | emask
        parallax = float(np.median(_rotation_residual(R_rot, x1[support], x2[support]))) * focal
        if parallax < cfg.min_parallax_px:
            inl = int(hmask.sum())
            return {"R": R_rot, "t": np.zeros(3), "baseline": 0.0, "translated": False, "parallax": parallax, "inliers": inl}

    if E is None or E.shape[0] < 3 or emask.sum() < cfg.min_matches:
        return {"reason": f"essential matrix estimation failed ({int(emask.sum())} RANSAC inliers of {n} matches)"}
    best = None
    for k in range(E.shape[0] // 3):  # the 5-point solver may return several candidates
        R, t, front, z1 = _pose_from_essential(E[3 * k : 3 * k + 3], x1[emask], x2[emask])
        if best is None or front.sum() > best[2].sum():
            best = (R, t, front, z1)
    assert best is not None
    R, t, front, z1 = best
    if front.sum() < cfg.min_matches:
        return {"reason": f"too few inliers in front of both cameras ({int(front.sum())} < {cfg.min_matches})"}
    parallax = float(np.median(_rotation_residual(R, x1[emask][front], x2[emask][front]))) * focal
    baseline = 1.0 / float(np.median(z1[front]))  # |t| = 1 in these units
    return {"R": R, "t": t, "baseline": baseline, "translated": True, "parallax": parallax, "inliers": int(front.sum())}


def estimate_relative_poses(
    frames: Tensor | np.ndarray,
    K: Tensor | np.ndarray,
    mode: PairMode = "consecutive",
    config: PoseEstimatorConfig | None = None,
) -> TwoViewPoses:
    """Relative camera poses between frames uint8 [F, H, W, 3] with intrinsics K [3, 3] or [F, 3, 3] (pixels).

    ``mode="consecutive"`` estimates pairs (i, i+1); ``"first"`` estimates pairs (0, j). Returns
    F - 1 pairs. Degenerate pairs never raise: they come back NaN with ``ok`` False and a reason.
    """
    cfg = config or PoseEstimatorConfig()
    video = _as_numpy_frames(frames)
    Ks = _as_numpy_intrinsics(K, video.shape[0])
    if mode not in ("consecutive", "first"):
        raise ValueError(f"mode must be 'consecutive' or 'first', got {mode!r}")
    det, norm = _detector(cfg)
    feats = [_detect(f, det) for f in video]
    pairs = [(i, i + 1) if mode == "consecutive" else (0, i + 1) for i in range(video.shape[0] - 1)]

    N = len(pairs)
    R = torch.full((N, 3, 3), math.nan, dtype=torch.float64)
    t_unit = torch.full((N, 3), math.nan, dtype=torch.float64)
    baseline = torch.full((N,), math.nan, dtype=torch.float64)
    parallax = torch.full((N,), math.nan, dtype=torch.float64)
    ok = torch.zeros(N, dtype=torch.bool)
    translated = torch.zeros(N, dtype=torch.bool)
    inliers = torch.zeros(N, dtype=torch.int64)
    reasons = [""] * N
    for n, (i, j) in enumerate(pairs):
        (p1, d1), (p2, d2) = feats[i], feats[j]
        m = _match(d1, d2, norm, cfg.ratio)
        res = _two_view(p1[m[:, 0]], p2[m[:, 1]], Ks[i], Ks[j], cfg)
        if "reason" in res and cfg.fallback == "flow":
            flow = _two_view(*_flow_matches(video[i], video[j], cfg), Ks[i], Ks[j], cfg)
            res = flow if "reason" not in flow else {"reason": f"{res['reason']}; dense flow: {flow['reason']}"}
        if "reason" in res:
            reasons[n] = f"pair ({i}, {j}): {res['reason']}"
            continue
        # OpenCV gives X_j = R X_i + t; the pose of camera j in camera i is [R^T | -R^T t].
        Rc, tc = torch.from_numpy(res["R"]), torch.from_numpy(np.asarray(res["t"], dtype=np.float64))
        R[n] = Rc.T
        t_unit[n] = -Rc.T @ tc
        baseline[n] = res["baseline"]
        parallax[n] = res["parallax"]
        inliers[n] = res["inliers"]
        ok[n] = True
        translated[n] = res["translated"]
    pair_ids = torch.tensor(pairs, dtype=torch.int64).reshape(N, 2)
    return TwoViewPoses(mode, pair_ids, R, t_unit, baseline, ok, translated, parallax, inliers, reasons)


def estimate_trajectory(
    frames: Tensor | np.ndarray,
    K: Tensor | np.ndarray,
    mode: PairMode = "first",
    config: PoseEstimatorConfig | None = None,
) -> tuple[Tensor, TwoViewPoses]:
    """c2w [F, 4, 4] (first camera = identity, translations in units of scene depth) and the pair estimates."""
    est = estimate_relative_poses(frames, K, mode, config)
    return est.trajectory(), est


def geodesic_deg(R: Tensor) -> Tensor:
    """Rotation angle in degrees of R [..., 3, 3] (stable near 0 and 180: atan2 of sin and cos)."""
    w = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], dim=-1)
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    return torch.rad2deg(torch.atan2(w.norm(dim=-1) / 2.0, cos))


def fit_scale(est: Tensor, ref: Tensor) -> float:
    """Least-squares s >= 0 minimising sum |s est - ref|^2 over vectors [N, 3]; NaN if est is all zero.

    Negative scales are clamped to 0: a mirrored trajectory must not look correct.
    """
    den = float(est.double().square().sum())
    if den <= 1e-24:
        return math.nan
    return max(float((est.double() * ref.double()).sum()) / den, 0.0)


def _nan_errors(num_frames: int, reason: str) -> dict[str, float | int | str]:
    nan = math.nan
    return {"R_dist_deg": nan, "T_dist": nan, "T_dist_rel": nan, "scale": nan, "num_frames": num_frames, "reason": reason}


def camera_errors(c2w_est: Tensor, c2w_ref: Tensor, align_scale: bool = True) -> dict[str, float | int | str]:
    """Rotation and translation errors of an estimated trajectory c2w_est [F, 4, 4] against c2w_ref [F, 4, 4].

    Both are re-based to their first camera; frames 1..F-1 with finite estimates are scored:
    ``R_dist_deg`` = mean geodesic angle of R_est R_ref^T; ``T_dist`` = mean |s c_est - c_ref| of
    camera centres, with one least-squares scale s >= 0 (``align_scale``; else s = 1);
    ``T_dist_rel`` = T_dist / mean |c_ref|. Returns floats; NaN with a reason when undefined.
    """
    est, ref = torch.as_tensor(c2w_est).double(), torch.as_tensor(c2w_ref).double()
    if ref.ndim != 3 or ref.shape[-2:] != (4, 4) or est.shape != ref.shape:
        raise ValueError(f"c2w_est and c2w_ref must both be [F, 4, 4], got {tuple(est.shape)} and {tuple(ref.shape)}")
    if ref.shape[0] < 2:
        raise ValueError(f"camera_errors needs at least 2 frames, got {ref.shape[0]}")
    bad = (~is_rigid(ref)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"c2w_ref: frames {bad} are not finite rigid transforms")
    num = ref.shape[0] - 1
    if not is_rigid(est[:1]).all():
        return _nan_errors(0, "first estimated pose is not a finite rigid transform")
    est, ref = rebase_to_first(est), rebase_to_first(ref)
    valid = torch.isfinite(est[1:]).flatten(1).all(dim=1)
    if not valid.any():
        return _nan_errors(0, f"no finite estimated poses among {num} frames")
    e, r = est[1:][valid], ref[1:][valid]
    r_dist = float(geodesic_deg(e[:, :3, :3] @ r[:, :3, :3].transpose(-1, -2)).mean())
    ce, cr = e[:, :3, 3], r[:, :3, 3]
    reason = "" if bool(valid.all()) else f"{int((~valid).sum())} of {num} frames have no estimate"
    scale = 1.0
    if align_scale:
        scale = fit_scale(ce, cr)
        if math.isnan(scale):
            scale = 1.0
            reason = "; ".join(x for x in (reason, "estimated trajectory does not translate: scale not fitted") if x)
    t_err = (scale * ce - cr).norm(dim=-1).mean()
    extent = float(cr.norm(dim=-1).mean())
    return {
        "R_dist_deg": r_dist,
        "T_dist": float(t_err),
        "T_dist_rel": float(t_err) / extent if extent > 0 else math.nan,
        "scale": scale,
        "num_frames": int(valid.sum()),
        "reason": reason,
    }
