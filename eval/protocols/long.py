"""The ``long`` protocol: go out along a random composite path and come back along the same poses.

Per clip, a revisit path of T latents (``long_latents``, or ``long_window_multiple`` times the
model's training window, rounded up to whole rollout units): out along a random path, then the
same poses in reverse (``eval.protocols.walks.plan_path``: the synthetic world's own planner when
the clip's scene is known, else a walk from the clip's first frame and pose). On the return path
every latent frame (the last frame of its group: the one whose pose the model was given) is
compared

- (a) ``truth_*``: with the synthetic world's true render at that pose (synthetic data only);
- (b) ``self_*``: with the frame generated at the same pose on the way out (the paper's protocol).

Camera errors score the whole out-and-back path (latent frames vs commanded poses); on synthetic
data the same estimator on the true renders gives the ``gt_`` (oracle) numbers.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from data.latents import latent_frame_index, num_frames
from eval.lpips import LPIPS
from eval.protocols.clips import EvalClip
from eval.protocols.config import ProtocolConfig
from eval.protocols.runner import Request, VideoModel
from eval.protocols.scoring import Example, ProtocolResult, camera_scores, frame_scores, mean_curve, summarize
from eval.protocols.walks import plan_path

__all__ = ["run_long", "long_length"]

_CAM = ("R_dist_deg", "T_dist", "T_dist_rel", "failed_pairs", "reason")


def long_length(model: VideoModel, cfg: ProtocolConfig) -> tuple[int, str]:
    """Latents of the long trajectory and how that number was chosen."""
    if cfg.long_latents is not None:
        want, why = cfg.long_latents, f"long_latents={cfg.long_latents}"
    else:
        window = model.settings.train_latents
        if window is None:  # no record of the training window: the largest context the sampler builds
            window = model.settings.rollout.memory.max_context + model.unit
            why = f"{cfg.long_window_multiple} x (memory.max_context + unit) = {cfg.long_window_multiple} x {window}"
        else:
            why = f"{cfg.long_window_multiple} x training window {window}"
        want = cfg.long_window_multiple * window
    T = -(-max(want, 3) // model.unit) * model.unit  # round up to whole units
    return T, why


def run_long(model: VideoModel, clips: list[EvalClip], cfg: ProtocolConfig, lpips: Optional[LPIPS] = None) -> ProtocolResult:
    """Score ``model`` on out-and-back paths from ``clips`` (see the module docstring)."""
    t0 = time.perf_counter()
    res = ProtocolResult("long")
    T, why = long_length(model, cfg)
    res.notes.append(f"{T} latents per path ({why}), {num_frames(T, model.stride)} frames")
    s = model.stride
    F = num_frames(T, s)
    idx = latent_frame_index(F, s).numpy()
    curves: dict[str, list] = {}
    paths = [plan_path("revisit", clip, T, s, model.settings.steps, np.random.default_rng([cfg.seed, i, 1]), cfg.walk)
             for i, clip in enumerate(clips)]
    gens = model.generate_many([Request(p.image, p.c2w, clip.K[0], clip.caption, seed=cfg.seed + i)
                                for i, (clip, p) in enumerate(zip(clips, paths))], cfg.batch)
    for clip, path, gen in zip(clips, paths, gens):
        K0 = clip.K[0]
        lat = gen[idx]  # [T, H, W, 3]: the frame of each latent
        ret, out = path.pairs[:, 0].numpy(), path.pairs[:, 1].numpy()
        x = (ret * s).tolist()  # frame index of each return latent
        row = {"clip": clip.name, "latents": T, "frames": F, "return_latents": len(ret), "path": path.source, "notes": path.notes}
        self_scores = frame_scores(lat[ret], lat[out], lpips, cfg.psnr_cap)
        row.update({f"self_{k}": float(v.mean()) for k, v in self_scores.items()})
        for k, v in self_scores.items():
            curves.setdefault(f"self_{k}", []).append((x, v.tolist()))
        cam = camera_scores(lat, K0, path.c2w, cfg.pose_mode, cfg.estimator)
        row.update({k: cam[k] for k in _CAM})
        row["camera_finite"] = float(np.isfinite(cam["R_dist_deg"]))
        if path.truth is not None:
            truth_scores = frame_scores(lat[ret], path.truth[ret], lpips, cfg.psnr_cap)
            row.update({f"truth_{k}": float(v.mean()) for k, v in truth_scores.items()})
            for k, v in truth_scores.items():
                curves.setdefault(f"truth_{k}", []).append((x, v.tolist()))
            oracle = camera_scores(path.truth, K0, path.c2w, cfg.pose_mode, cfg.estimator)
            row.update({f"gt_{k}": oracle[k] for k in _CAM})
            row["gt_camera_finite"] = float(np.isfinite(oracle["R_dist_deg"]))
        else:
            row["truth_reason"] = clip.scene_note or "; ".join(path.notes)
        res.clips.append(row)
        if len(res.examples) < cfg.num_examples:
            if path.truth is not None:
                res.examples.append(Example(f"long {clip.name} (return path)", path.truth[ret], lat[ret], "true render"))
            else:
                res.examples.append(Example(f"long {clip.name} (return path)", lat[out], lat[ret], "generated on the way out"))
    no_truth = [c for c in res.clips if "truth_reason" in c]
    if no_truth:
        res.notes.append(f"{len(no_truth)} of {len(res.clips)} clips have no true render ({no_truth[0]['truth_reason']})")
    keys = ["self_psnr", "self_ssim", "self_lpips", "truth_psnr", "truth_ssim", "truth_lpips",
            "R_dist_deg", "T_dist", "T_dist_rel", "gt_R_dist_deg", "gt_T_dist", "gt_T_dist_rel",
            "camera_finite", "gt_camera_finite"]
    res.summary, res.intervals = summarize(res.clips, keys)
    res.summary["num_clips"] = len(res.clips)
    res.summary["num_truth_clips"] = len(res.clips) - len(no_truth)
    res.curves = {k: mean_curve(rows, "frame") for k, rows in curves.items()}
    res.seconds = time.perf_counter() - t0
    return res
