"""One synthetic clip in the clip contract: scene + key-driven trajectory + rendering, all from seeds."""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from data.contract import validate_clip
from data.geometry import make_intrinsics
from data.synthetic.config import SyntheticConfig
from data.synthetic.raycast import render_batch
from data.synthetic.scene import Scene
from data.synthetic.trajectories import frame_steps, plan_trajectory

__all__ = ["attach_frames", "derive_seed", "make_clip", "plan_clip", "render_clips"]


def derive_seed(*parts: int) -> int:
    """A stable 32-bit seed from integers (numpy's SeedSequence: independent of platform and hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def plan_clip(
    seed: int,
    config: SyntheticConfig | None = None,
    *,
    scene: Scene | None = None,
    scene_seed: int | None = None,
    kind: str | None = None,
) -> tuple[Scene, dict]:
    """Everything of :func:`make_clip`'s clip but its frames: (scene, clip without "video" / "depth").

    The host part of a clip (scene, trajectory planning, metadata): cheap to run in worker
    processes while a GPU renders the frames of earlier clips (:func:`render_clips`).
    """
    cfg = config or SyntheticConfig()
    if scene is None:
        scene_seed = seed if scene_seed is None else scene_seed
        scene = Scene.random(scene_seed, cfg.scene)
    rng = np.random.default_rng([seed, 2])
    requested = kind or cfg.trajectory
    traj = plan_trajectory(requested, scene, cfg.num_frames, rng, cfg.motion)
    K = make_intrinsics(cfg.fov_x_deg, cfg.width, cfg.height)
    steps = frame_steps(cfg.motion)
    meta = {
        "source": "synthetic",
        "scene_id": f"synthetic-{scene.seed}",
        "scene_seed": scene.seed,
        "clip_seed": int(seed),
        "fps": float(cfg.fps),
        "trajectory": traj.kind,
        "trajectory_requested": requested,
        "stride": cfg.motion.stride,
        "step_translation": steps.translation,
        "step_rotation_deg": steps.rotation_deg,
        "fov_x_deg": float(cfg.fov_x_deg),
        "supersample": int(cfg.supersample),
        "world_up": [0.0, -1.0, 0.0],
        **traj.info,
    }
    if scene.config is not None:  # with scene_seed, enough to rebuild the scene: Scene.random(seed, SceneConfig(**d))
        meta["scene_config"] = asdict(scene.config)
    clip = {
        "c2w": traj.c2w.float().numpy(),
        "K": K.expand(cfg.num_frames, 3, 3).numpy().copy(),
        "keys": traj.keys.numpy(),
        "caption": scene.caption(),
        "meta": meta,
    }
    return scene, clip


def render_clips(
    plans: Sequence[tuple[Scene, dict]], config: SyntheticConfig | None = None, device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Ray cast planned clips (from :func:`plan_clip`, same config) in one batch on ``device``.

    Returns RGB uint8 [B * F, H, W, 3] and depth float32 [B * F, H, W], clip after clip, on
    ``device``; on CUDA this returns once the work is queued. Each clip's frames are the bytes of
    rendering it alone (``raycast.render_batch``).
    """
    cfg = config or SyntheticConfig()
    if not plans:
        raise ValueError("render_clips: no clips")
    frames = [int(clip["c2w"].shape[0]) for _, clip in plans]
    c2w = torch.from_numpy(np.concatenate([clip["c2w"] for _, clip in plans]))
    index = torch.repeat_interleave(torch.arange(len(plans)), torch.tensor(frames))
    K = make_intrinsics(cfg.fov_x_deg, cfg.width, cfg.height)
    return render_batch([scene for scene, _ in plans], c2w, K, cfg.height, cfg.width, scene_index=index,
                        supersample=cfg.supersample, device=device)


def attach_frames(plans: Sequence[tuple[Scene, dict]], video: np.ndarray, depth: np.ndarray | None) -> list[dict]:
    """The planned clips with their frames (host arrays [B * F, ...] from :func:`render_clips`), validated."""
    out, f0 = [], 0
    for _, clip in plans:
        f1 = f0 + int(clip["c2w"].shape[0])
        full = {"video": video[f0:f1], **clip}
        if depth is not None:
            full["depth"] = depth[f0:f1]
        validate_clip(full, where=f"synthetic clip seed={clip['meta']['clip_seed']}")
        out.append(full)
        f0 = f1
    return out


def make_clip(
    seed: int,
    config: SyntheticConfig | None = None,
    *,
    scene: Scene | None = None,
    scene_seed: int | None = None,
    kind: str | None = None,
    device: str | torch.device = "cpu",
    depth: bool = True,
) -> dict:
    """A contract clip (numpy arrays, with depth unless ``depth=False``) from ``seed``.

    The scene is ``scene``, else ``Scene.random(scene_seed)`` (default ``seed``); the trajectory
    kind is ``kind``, else ``config.trajectory``; the trajectory draws from ``seed``. The frames are
    ray cast on ``device`` (the same code on a CPU or a GPU); the same arguments give the same
    poses and keys on every device, and the same bytes on the same device (alone or batched with
    other clips: :func:`plan_clip` + :func:`render_clips`).
    """
    cfg = config or SyntheticConfig()
    plan = plan_clip(seed, cfg, scene=scene, scene_seed=scene_seed, kind=kind)
    video, depth_map = render_clips([plan], cfg, device)
    return attach_frames([plan], video.cpu().numpy(), depth_map.cpu().numpy() if depth else None)[0]
