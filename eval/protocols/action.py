"""The ``action`` protocol: does the video follow random composite actions? (WorldCompass)

Per clip, a random composite key sequence of ``action_latents`` latents (whole rollout units;
``eval.protocols.walks.plan_path``: the synthetic world's planner when the clip's scene is known,
else a walk from the clip's first frame and pose), integrated with the bundle's motion steps. The
generated latent frames give step motions (two-view geometry between consecutive latent frames),
classified with the training-data rule and compared with the commanded keys: exact 81-class
accuracy and the fine accuracy (mean of translation and rotation accuracy). With a known scene,
the true renders of the commanded path give the ``gt_`` (oracle) accuracy of the estimator itself.
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
from eval.protocols.scoring import Example, ProtocolResult, action_scores, mean_curve, summarize
from eval.protocols.walks import plan_path

__all__ = ["run_action"]

_ACC = ("action_acc", "fine_action_acc", "translation_acc", "rotation_acc", "threshold", "num_failed", "reason")


def run_action(model: VideoModel, clips: list[EvalClip], cfg: ProtocolConfig, lpips: Optional[LPIPS] = None) -> ProtocolResult:
    """Score ``model``'s action following from ``clips``' first frames (see the module docstring)."""
    del lpips  # no image comparison in this protocol
    t0 = time.perf_counter()
    res = ProtocolResult("action")
    T = model.fit_length(cfg.action_latents)
    shortest = -(-2 // model.unit) * model.unit  # whole units holding at least one step
    if T < shortest:
        T = shortest
        res.notes.append(f"action_latents={cfg.action_latents} holds no whole rollout unit with a step: using {T} latents")
    s = model.stride
    F = num_frames(T, s)
    idx = latent_frame_index(F, s).numpy()
    res.notes.append(f"{T} latents per sequence ({F} frames), {T - 1} scored steps each")
    hits_rows, gt_rows = [], []
    paths = [plan_path("random", clip, T, s, model.settings.steps, np.random.default_rng([cfg.seed, i, 2]), cfg.walk)
             for i, clip in enumerate(clips)]
    gens = model.generate_many([Request(p.image, p.c2w, clip.K[0], clip.caption, seed=cfg.seed + i)
                                for i, (clip, p) in enumerate(zip(clips, paths))], cfg.batch)
    for clip, path, gen in zip(clips, paths, gens):
        K0 = clip.K[0]
        lat = gen[idx]
        acc = action_scores(lat, K0, path.keys, model.settings.steps, cfg.actions, cfg.estimator)
        row = {"clip": clip.name, "latents": T, "path": path.source, "notes": path.notes, **{k: acc[k] for k in _ACC}}
        hits_rows.append((range(1, T), [float(h) for h in acc["step_hits"]]))
        if path.truth is not None:
            oracle = action_scores(path.truth, K0, path.keys, model.settings.steps, cfg.actions, cfg.estimator)
            row.update({f"gt_{k}": oracle[k] for k in _ACC})
            gt_rows.append((range(1, T), [float(h) for h in oracle["step_hits"]]))
            if len(res.examples) < cfg.num_examples:
                res.examples.append(Example(f"action {clip.name}", path.truth, lat, "true render of the commanded path"))
        elif len(res.examples) < cfg.num_examples:
            res.examples.append(Example(f"action {clip.name}", np.repeat(path.image[None], T, axis=0), lat, "first frame"))
        res.clips.append(row)
    keys_ = ["action_acc", "fine_action_acc", "translation_acc", "rotation_acc", "gt_action_acc", "gt_fine_action_acc"]
    res.summary, res.intervals = summarize(res.clips, keys_)
    res.summary["num_clips"] = len(res.clips)
    res.curves = {"step_acc": mean_curve(hits_rows, "latent step")}
    if gt_rows:
        res.curves["gt_step_acc"] = mean_curve(gt_rows, "latent step")
    res.seconds = time.perf_counter() - t0
    return res
