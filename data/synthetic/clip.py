"""One synthetic clip in the clip contract: scene + key-driven trajectory + rendering, all from seeds."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from data.contract import validate_clip
from data.geometry import make_intrinsics
from data.synthetic.config import SyntheticConfig
from data.synthetic.raycast import render
from data.synthetic.scene import Scene
from data.synthetic.trajectories import frame_steps, plan_trajectory

__all__ = ["derive_seed", "make_clip"]


def derive_seed(*parts: int) -> int:
    """A stable 32-bit seed from integers (numpy's SeedSequence: independent of platform and hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


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
    poses and keys on every device, and the same bytes on the same device.
    """
    cfg = config or SyntheticConfig()
    if scene is None:
        scene_seed = seed if scene_seed is None else scene_seed
        scene = Scene.random(scene_seed, cfg.scene)
    rng = np.random.default_rng([seed, 2])
    requested = kind or cfg.trajectory
    traj = plan_trajectory(requested, scene, cfg.num_frames, rng, cfg.motion)
    K = make_intrinsics(cfg.fov_x_deg, cfg.width, cfg.height)
    c2w = traj.c2w.float()
    video, depth_map = render(scene, c2w.to(device), K.to(device), cfg.height, cfg.width, supersample=cfg.supersample)
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
        "video": video.cpu().numpy(),
        "c2w": c2w.numpy(),
        "K": K.expand(cfg.num_frames, 3, 3).numpy().copy(),
        "keys": traj.keys.numpy(),
        "caption": scene.caption(),
        "meta": meta,
    }
    if depth:
        clip["depth"] = depth_map.cpu().numpy()
    validate_clip(clip, where=f"synthetic clip seed={seed}")
    return clip
