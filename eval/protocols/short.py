"""The ``short`` protocol: re-generate held-out clips from their first frame and true camera path.

Per clip: the first T latents that fit (at most ``short_latents``, whole rollout units), i.e. frames
0 .. F-1 with F = 1 + stride (T - 1). The model gets frame 0 and the per-latent poses and intrinsics
of the clip. Frames 1 .. F-1 are compared with the clip (frame 0 is the conditioning image and is
left out): PSNR, SSIM, LPIPS per frame, averaged per clip, then over clips. Camera errors compare
the poses estimated from the generated latent frames with the clip's; the same estimator on the
clip's own frames gives the ``gt_`` (oracle) numbers that bound what the camera metrics can tell.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from data.geometry import rebase_to_first
from data.latents import latent_frame_index, num_frames
from eval.lpips import LPIPS
from eval.protocols.clips import EvalClip
from eval.protocols.config import ProtocolConfig
from eval.protocols.runner import Request, VideoModel
from eval.protocols.scoring import Example, ProtocolResult, camera_scores, frame_scores, mean_curve, summarize

__all__ = ["run_short"]


def run_short(model: VideoModel, clips: list[EvalClip], cfg: ProtocolConfig, lpips: Optional[LPIPS] = None) -> ProtocolResult:
    """Score ``model`` on ``clips`` with the short protocol (see the module docstring)."""
    t0 = time.perf_counter()
    res = ProtocolResult("short")
    s = model.stride
    curves: dict[str, list] = {}
    todo = []
    for i, clip in enumerate(clips):
        T = model.fit_length(min(cfg.short_latents, clip.num_latents(s)))
        if T < 2:
            res.notes.append(f"{clip.name}: skipped: {clip.num_frames} frames hold fewer than one rollout unit "
                             f"of >= 2 latents ({model.unit} latents per unit, stride {s})")
            continue
        F = num_frames(T, s)
        c2w = rebase_to_first(clip.c2w[:F])
        todo.append((i, clip, T, F, c2w, latent_frame_index(F, s)))
    gens = model.generate_many([Request(clip.video[0], c2w[idx], clip.K[idx], clip.caption, seed=cfg.seed + i)
                                for i, clip, T, F, c2w, idx in todo], cfg.batch)
    for (i, clip, T, F, c2w, idx), gen in zip(todo, gens):
        gt = clip.video[:F]
        scores = frame_scores(gen[1:], gt[1:], lpips, cfg.psnr_cap)
        cam = camera_scores(gen[idx.numpy()], clip.K[idx], c2w[idx], cfg.pose_mode, cfg.estimator)
        oracle = camera_scores(gt[idx.numpy()], clip.K[idx], c2w[idx], cfg.pose_mode, cfg.estimator)
        row = {"clip": clip.name, "latents": T, "frames": F, **{k: float(v.mean()) for k, v in scores.items()}}
        # The static reference: the first frame held. A model that does not beat it has not learnt motion.
        hold = frame_scores(np.repeat(gt[:1], F - 1, axis=0), gt[1:], None, cfg.psnr_cap)
        row.update(hold_psnr=float(hold["psnr"].mean()), hold_ssim=float(hold["ssim"].mean()))
        row["gain_psnr"] = row["psnr"] - row["hold_psnr"]
        row.update({k: cam[k] for k in ("R_dist_deg", "T_dist", "T_dist_rel", "failed_pairs", "reason")})
        row.update({f"gt_{k}": oracle[k] for k in ("R_dist_deg", "T_dist", "T_dist_rel", "failed_pairs", "reason")})
        row["camera_finite"], row["gt_camera_finite"] = float(np.isfinite(cam["R_dist_deg"])), float(np.isfinite(oracle["R_dist_deg"]))
        res.clips.append(row)
        for k, v in scores.items():
            curves.setdefault(k, []).append((range(1, F), v.tolist()))
        if len(res.examples) < cfg.num_examples:
            res.examples.append(Example(f"short {clip.name}", gt, gen))
    keys = ["psnr", "ssim", "lpips", "hold_psnr", "hold_ssim", "gain_psnr", "R_dist_deg", "T_dist", "T_dist_rel", "gt_R_dist_deg", "gt_T_dist", "gt_T_dist_rel",
            "camera_finite", "gt_camera_finite"]
    res.summary, res.intervals = summarize(res.clips, keys)
    res.summary["num_clips"] = len(res.clips)
    res.curves = {k: mean_curve(rows, "frame") for k, rows in curves.items()}
    res.seconds = time.perf_counter() - t0
    return res
