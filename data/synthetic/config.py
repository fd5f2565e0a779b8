"""Typed configuration of the procedural synthetic world (registered with Hydra by the lead).

Units are metres-ish. The world frame is y-down like the cameras: the floor is the plane y = 0 and
everything above it has y < 0, so a level camera has a pure-yaw rotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SceneConfig:
    """How :meth:`data.synthetic.scene.Scene.random` draws a world."""

    half_extent_min: float = 4.0  # room half-size, drawn per axis (x and z) in [min, max]
    half_extent_max: float = 7.0
    ceiling_height: float = 3.0  # height of a roofed room
    sky_prob: float = 0.5  # probability that the room is open to a painted sky box instead
    sky_height: float = 12.0  # height of the sky box when open
    wall_height: float = 2.5  # painted wall height under an open sky (sky texture above it)
    boxes_min: int = 6
    boxes_max: int = 12
    cylinders_min: int = 2
    cylinders_max: int = 6
    pillar_prob: float = 0.4  # a cylinder reaches the ceiling (capped at 4 m under a sky)
    spheres_min: int = 1
    spheres_max: int = 4
    object_gap: float = 1.0  # free space kept between object footprints and to the walls (corridors)
    fog_density: float = 0.03  # per unit of distance; 0 disables fog


@dataclass
class TrajectoryConfig:
    """How held keys drive the camera (``data.actions`` semantics).

    Actions are held for whole latents of ``stride`` frames. Per *frame* the camera moves
    ``latent_translation / stride`` units and turns ``latent_rotation_deg / stride`` degrees, so one
    latent of a held key is WorldPlay's increment: 0.08 units / 3 deg by default (0.02 / 0.75 per frame).
    """

    stride: int = 4  # video frames per latent (the autoencoder's temporal stride)
    latent_translation: float = 0.08
    latent_rotation_deg: float = 3.0
    eye_height: float = 1.4  # start height above the floor
    height_band: float = 0.5  # the camera stays within eye_height +- this (pitched moves climb)
    margin: float = 0.35  # clearance from object footprints, walls, floor and ceiling
    max_pitch_deg: float = 15.0  # |elevation of the view direction|
    max_roll_deg: float = 5.0  # yawing while pitched rolls the camera: keep it bounded
    segment_min_latents: int = 1  # a sampled action is held for this many latents ...
    segment_max_latents: int = 6  # ... up to this many
    # Weights of the composite-action categories of the `random` walk (normalised).
    w_move: float = 0.25
    w_yaw: float = 0.20
    w_move_yaw: float = 0.30
    w_pitch: float = 0.06
    w_move_pitch: float = 0.06
    w_yaw_pitch: float = 0.06
    w_still: float = 0.07
    orbit_radius_min: float = 1.6  # never below the radius the key steps allow (1.53 by default)
    orbit_radius_max: float = 4.0
    # `mixed` picks a kind per clip with these weights (normalised).
    mix_random: float = 0.5
    mix_revisit: float = 0.3
    mix_orbit: float = 0.2


@dataclass
class SyntheticConfig:
    """One synthetic clip: size, camera, trajectory kind and the two sub-configs."""

    num_frames: int = 65  # 1 + stride * k (latent-friendly)
    height: int = 64
    width: int = 64
    fov_x_deg: float = 90.0  # WorldPlay's default K (fx 969.7 at 1920 wide) is ~89.4 deg
    supersample: int = 1  # s x s rays per pixel, box-filtered (anti-aliasing; the small demo sizes need it)
    fps: float = 16.0
    trajectory: str = "mixed"  # random | revisit | orbit | mixed
    scene: SceneConfig = field(default_factory=SceneConfig)
    motion: TrajectoryConfig = field(default_factory=TrajectoryConfig)
