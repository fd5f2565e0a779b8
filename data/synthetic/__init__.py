"""The procedural synthetic world: seeded scenes, exact ray-cast RGB + depth, key-driven trajectories.

    scene = Scene.random(seed)                                   # same seed -> same world
    keys, c2w = make_trajectory("revisit", scene, 65, rng)       # bool [F, 8], float64 [F, 4, 4]
    rgb, depth = render(scene, c2w, K, H, W)                     # uint8 [F, H, W, 3], float32 [F, H, W]
    rgb, depth = render_batch(scenes, c2w, K, H, W, scene_index=i)   # frames of several scenes in one launch sequence
    clip = make_clip(seed)                                       # a contract clip (data.contract)

``python -m data.synthetic --out DIR --clips N ...`` writes shards (see ``__main__``).
"""

from data.synthetic.clip import derive_seed, make_clip, plan_clip, render_clips
from data.synthetic.config import SceneConfig, SyntheticConfig, TrajectoryConfig
from data.synthetic.dataset import dataset_clip, iter_dataset_clips, plan_dataset_clip
from data.synthetic.raycast import render, render_batch
from data.synthetic.scene import Box, Cylinder, Scene, Sphere
from data.synthetic.trajectories import TRAJECTORY_KINDS, Trajectory, frame_steps, make_trajectory, plan_trajectory

__all__ = [
    "Box",
    "Cylinder",
    "Sphere",
    "Scene",
    "SceneConfig",
    "SyntheticConfig",
    "TrajectoryConfig",
    "TRAJECTORY_KINDS",
    "Trajectory",
    "dataset_clip",
    "derive_seed",
    "frame_steps",
    "iter_dataset_clips",
    "make_clip",
    "make_trajectory",
    "plan_clip",
    "plan_dataset_clip",
    "plan_trajectory",
    "render",
    "render_batch",
    "render_clips",
]
