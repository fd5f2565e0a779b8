"""The ``control`` protocol: how much does the video depend on the commanded actions and cameras?

Synthetic clips only (the world renders the exact truth of any path). Per clip, two collision-free
paths A and B of ``control_latents`` latents leave the same start pose (the data package's planner,
the second branched off the first's start and redrawn until the two true videos differ). The model
generates both from the same image with the same seed; its latent frames after the first are
scored against both truths:

    control = ½ [(PSNR(gen_A, true_A) − PSNR(gen_A, true_B)) + (PSNR(gen_B, true_B) − PSNR(gen_B, true_A))]

in dB: how much closer each video is to the path it was told to follow than to the other one. A
model that ignores its controls makes gen_A = gen_B (same image, same noise; the history is used
whole within one memory window), so its score is exactly 0; following perfectly scores the truths'
own separation. A second number ablates the network's control inputs: ``null_cost`` is
PSNR(gen_A, true_A) minus the same with every action set to 0 and every camera to the identity at
the network's inputs (memory selection unchanged): the dB the controls are worth.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from data.latents import latent_frame_index, num_frames
from eval.lpips import LPIPS
from eval.protocols.clips import EvalClip
from eval.protocols.config import ProtocolConfig
from eval.protocols.runner import Request, VideoModel
from eval.protocols.scoring import Example, ProtocolResult, frame_scores, mean_curve, summarize
from eval.protocols.walks import EvalPath, plan_path

__all__ = ["run_control", "NullControls", "control_score"]

_KEYS = ("control", "follow_psnr", "swap_psnr", "null_psnr", "null_cost", "truth_separation")


class NullControls(nn.Module):
    """A world model whose action and camera inputs are cut: every call sees action 0 and identity cameras.

    Wraps a WorldDiT-like model for the rollout sampler (forward, new_cache, fill_text_cache,
    fill_context_cache), so the sampler, memory and schedule are unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    @staticmethod
    def _null(kw: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kw)
        if kw.get("actions") is not None:
            kw["actions"] = torch.zeros_like(kw["actions"])
        if kw.get("w2c") is not None:
            kw["w2c"] = torch.eye(4, device=kw["w2c"].device, dtype=kw["w2c"].dtype).expand_as(kw["w2c"])
        return kw

    def forward(self, x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        return self.inner(x, sigma, **self._null(kw))

    def new_cache(self):
        return self.inner.new_cache()

    def fill_text_cache(self, cache, text, text_mask=None):
        return self.inner.fill_text_cache(cache, text, text_mask)

    def fill_context_cache(self, cache, **kw: Any):
        return self.inner.fill_context_cache(cache, **self._null(kw))


def control_score(gen_a: np.ndarray, gen_b: np.ndarray, true_a: np.ndarray, true_b: np.ndarray, cap: float) -> dict[str, float]:
    """The control score (dB) of two generated videos against the two truths (uint8 [N, H, W, 3] each)."""
    p = {name: float(frame_scores(g, t, None, cap)["psnr"].mean())
         for name, g, t in (("aa", gen_a, true_a), ("ab", gen_a, true_b), ("bb", gen_b, true_b), ("ba", gen_b, true_a))}
    return {
        "control": 0.5 * ((p["aa"] - p["ab"]) + (p["bb"] - p["ba"])),
        "follow_psnr": 0.5 * (p["aa"] + p["bb"]),
        "swap_psnr": 0.5 * (p["ab"] + p["ba"]),
    }


def _branch(clip: EvalClip, a: EvalPath, T: int, model: VideoModel, cfg: ProtocolConfig, i: int) -> tuple[EvalPath, float]:
    """Path B from A's start pose whose truth differs from A's the most over a few draws; (path, PSNR(true_A, true_B))."""
    best, best_psnr = None, float("inf")
    for attempt in range(cfg.control_attempts):
        rng = np.random.default_rng([cfg.seed, i, 4, attempt])
        b = plan_path("random", clip, T, model.stride, model.settings.steps, rng, cfg.walk, start=a.c2w[0])
        sep = float(frame_scores(a.truth[1:], b.truth[1:], None, cfg.psnr_cap)["psnr"].mean())
        if sep < best_psnr:
            best, best_psnr = b, sep
        if sep < cfg.control_separation_psnr:
            break
    return best, best_psnr


def run_control(model: VideoModel, clips: list[EvalClip], cfg: ProtocolConfig, lpips: Optional[LPIPS] = None) -> ProtocolResult:
    """Score how much ``model``'s video depends on its controls (see the module docstring)."""
    del lpips  # PSNR only: the score is a difference of distances, and LPIPS needs >= 31 px
    t0 = time.perf_counter()
    res = ProtocolResult("control")
    T = max(model.fit_length(cfg.control_latents), model.unit)
    s = model.stride
    F = num_frames(T, s)
    idx = latent_frame_index(F, s).numpy()
    res.notes.append(f"{T} latents per path ({F} frames); latent frames 1..{T - 1} scored")
    null = VideoModel(NullControls(model.model), model.autoencoder, model.settings, text_encoder=model.text_encoder,
                      device=model.device, name=f"{model.name} (controls cut)")
    curves: dict[str, list] = {}
    todo = []
    for i, clip in enumerate(clips):
        if clip.scene is None:
            res.notes.append(f"{clip.name}: skipped: no synthetic scene to render the other path ({clip.scene_note})")
            continue
        a = plan_path("random", clip, T, s, model.settings.steps, np.random.default_rng([cfg.seed, i, 3]), cfg.walk)
        todo.append((i, clip, a, *_branch(clip, a, T, model, cfg, i)))
    # A and B of a clip share its seed (the same noise), so only the commanded path differs.
    reqs_a = [Request(a.image, a.c2w, clip.K[0], clip.caption, seed=cfg.seed + i) for i, clip, a, b, _ in todo]
    reqs_b = [Request(b.image, b.c2w, clip.K[0], clip.caption, seed=cfg.seed + i) for i, clip, a, b, _ in todo]
    gens = model.generate_many(reqs_a + reqs_b, cfg.batch)
    nulls = null.generate_many(reqs_a, cfg.batch)
    for k, (i, clip, a, b, separation) in enumerate(todo):
        gen_a, gen_b, gen_n = gens[k][idx], gens[len(todo) + k][idx], nulls[k][idx]
        row: dict[str, Any] = {"clip": clip.name, "latents": T, "truth_separation": separation}
        row.update(control_score(gen_a[1:], gen_b[1:], a.truth[1:], b.truth[1:], cfg.psnr_cap))
        follow = frame_scores(gen_a[1:], a.truth[1:], None, cfg.psnr_cap)["psnr"]
        nulled = frame_scores(gen_n[1:], a.truth[1:], None, cfg.psnr_cap)["psnr"]
        row["null_psnr"] = float(nulled.mean())
        row["null_cost"] = float(follow.mean()) - row["null_psnr"]
        res.clips.append(row)
        curves.setdefault("follow_psnr", []).append((range(1, T), follow.tolist()))
        curves.setdefault("null_psnr", []).append((range(1, T), nulled.tolist()))
        if len(res.examples) < cfg.num_examples:
            res.examples.append(Example(f"control {clip.name}: path A", a.truth, gen_a, "true render of path A"))
            res.examples.append(Example(f"control {clip.name}: path B", b.truth, gen_b, "true render of path B"))
    if not res.clips:
        res.notes.append("no clip has a synthetic scene: the control protocol needs the synthetic world's renderer")
    res.summary, res.intervals = summarize(res.clips, _KEYS)
    res.summary["num_clips"] = len(res.clips)
    res.curves = {k: mean_curve(rows, "latent") for k, rows in curves.items()}
    res.seconds = time.perf_counter() - t0
    return res
