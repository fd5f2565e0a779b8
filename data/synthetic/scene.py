"""Seeded procedural scenes: a bounded room of textured analytic primitives with exact geometry.

World frame: y-down like OpenCV cameras (x, z horizontal; the floor is y = 0, the room spans
y in [-height, 0]). The room is the interior of the box [-half_x, half_x] x [-height, 0] x
[-half_z, half_z]: floor, four walls and a ceiling, or, under an open sky, walls painted up to
``wall_height`` with a sky texture on the box above. Objects stand on the floor: boxes (rotated
about the vertical), vertical cylinders (some reaching the ceiling: pillars) and spheres.

Every surface has a material: a colour pair and a procedural pattern keyed to the surface (tiles
or bricks with per-tile brightness on the room, stripes / checkers / bands / dots on objects,
each object its own hue), so that motion is visible everywhere and places can be told apart.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from data.synthetic.config import SceneConfig

__all__ = [
    "BOX",
    "CYLINDER",
    "SPHERE",
    "Box",
    "Cylinder",
    "Sphere",
    "Materials",
    "Scene",
]

# Object kinds (rows of Scene are sorted by kind).
BOX, CYLINDER, SPHERE = 0, 1, 2
KIND_NAMES = ("box", "cylinder", "sphere")
# Patterns (see data.synthetic.shading).
STRIPES, CHECKERS, BANDS, DOTS, TILES, BRICKS, SKY = range(7)
# Room materials come first in the material table; object i uses material NUM_ROOM_MATERIALS + i.
FLOOR, CEILING, WALL_PX, WALL_NX, WALL_PZ, WALL_NZ, SKY_MATERIAL = range(7)
NUM_ROOM_MATERIALS = 7


@dataclass(frozen=True)
class Box:
    """A box standing on the floor: centre (x, z), half sizes along its own x and z, rotated by yaw."""

    x: float
    z: float
    half_x: float
    half_z: float
    height: float
    yaw_deg: float = 0.0


@dataclass(frozen=True)
class Cylinder:
    """A vertical cylinder standing on the floor at (x, z)."""

    x: float
    z: float
    radius: float
    height: float


@dataclass(frozen=True)
class Sphere:
    """A sphere at (x, y, z); by default (y None) it rests on the floor (y = -radius)."""

    x: float
    z: float
    radius: float
    y: float | None = None


Primitive = Box | Cylinder | Sphere


@dataclass
class Materials:
    """Material table [M]: pattern id, pattern scale (units), pattern angle (rad), two RGB colours in [0, 1]."""

    pattern: Tensor  # int64 [M]
    scale: Tensor  # float32 [M]
    angle: Tensor  # float32 [M]
    color1: Tensor  # float32 [M, 3]
    color2: Tensor  # float32 [M, 3]

    def to(self, device: torch.device | str) -> "Materials":
        return Materials(*(getattr(self, k).to(device) for k in ("pattern", "scale", "angle", "color1", "color2")))


def _hsv(h: float, s: float, v: float) -> list[float]:
    return list(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


@dataclass
class Scene:
    """A world: room bounds, objects (one row each, sorted by kind), materials, light and fog.

    ``center`` [N, 3] is each object's centre (x, y, z); ``half`` [N, 3] its half sizes in its own
    frame (box: half_x, half_y, half_z; cylinder: r, h/2, r; sphere: r, r, r); ``yaw`` [N] rotates
    the object's frame about the vertical (world-from-object = ``geometry.rotation_y(yaw)``).
    """

    half_x: float
    half_z: float
    height: float
    wall_height: float  # == height under a ceiling
    sky: bool
    kind: Tensor  # int64 [N]
    center: Tensor  # float32 [N, 3]
    half: Tensor  # float32 [N, 3]
    yaw: Tensor  # float32 [N], radians
    materials: Materials  # [NUM_ROOM_MATERIALS + N]
    light: Tensor  # float32 [3], unit vector pointing towards the light
    ambient: float
    fog_density: float
    fog_color: Tensor  # float32 [3]
    seed: int = 0
    config: SceneConfig | None = None  # set by Scene.random: Scene.random(seed, config) rebuilds this scene

    # ------------------------------------------------------------------------------------------
    # Construction

    @staticmethod
    def build(
        half_x: float,
        half_z: float,
        height: float,
        primitives: list[Primitive] | tuple[Primitive, ...] = (),
        *,
        sky: bool = False,
        wall_height: float | None = None,
        fog_density: float = 0.03,
        seed: int = 0,
    ) -> "Scene":
        """A scene from explicit primitives; colours, patterns and light are drawn from ``seed``."""
        if not (half_x > 0 and half_z > 0 and height > 0):
            raise ValueError(f"room half sizes and height must be positive, got {half_x}, {half_z}, {height}")
        rows: list[tuple[int, list[float], list[float], float]] = []
        for i, p in enumerate(primitives):
            if isinstance(p, Box):
                if min(p.half_x, p.half_z, p.height) <= 0:
                    raise ValueError(f"primitive {i}: box sizes must be positive, got {p}")
                rows.append((BOX, [p.x, -p.height / 2, p.z], [p.half_x, p.height / 2, p.half_z], math.radians(p.yaw_deg)))
            elif isinstance(p, Cylinder):
                if min(p.radius, p.height) <= 0:
                    raise ValueError(f"primitive {i}: cylinder radius and height must be positive, got {p}")
                rows.append((CYLINDER, [p.x, -p.height / 2, p.z], [p.radius, p.height / 2, p.radius], 0.0))
            elif isinstance(p, Sphere):
                if p.radius <= 0:
                    raise ValueError(f"primitive {i}: sphere radius must be positive, got {p}")
                y = -p.radius if p.y is None else p.y
                rows.append((SPHERE, [p.x, y, p.z], [p.radius] * 3, 0.0))
            else:
                raise TypeError(f"primitive {i}: expected Box, Cylinder or Sphere, got {type(p).__name__}")
        rows.sort(key=lambda r: r[0])  # stable: keeps the given order within a kind
        n = len(rows)
        rng = np.random.default_rng([seed, 1])
        materials, light, fog_color = _draw_materials(rng, n, sky)
        return Scene(
            half_x=float(half_x),
            half_z=float(half_z),
            height=float(height),
            wall_height=float(height if wall_height is None or not sky else wall_height),
            sky=bool(sky),
            kind=torch.tensor([r[0] for r in rows], dtype=torch.int64),
            center=torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(n, 3),
            half=torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(n, 3),
            yaw=torch.tensor([r[3] for r in rows], dtype=torch.float32),
            materials=materials,
            light=light,
            ambient=0.45,
            fog_density=float(fog_density),
            fog_color=fog_color,
            seed=int(seed),
        )

    @staticmethod
    def random(seed: int, config: SceneConfig | None = None) -> "Scene":
        """A random room with non-overlapping objects; the same seed always gives the same scene."""
        cfg = config or SceneConfig()
        rng = np.random.default_rng([seed, 0])
        hx, hz = (float(v) for v in rng.uniform(cfg.half_extent_min, cfg.half_extent_max, 2))
        sky = bool(rng.random() < cfg.sky_prob)
        height = cfg.sky_height if sky else cfg.ceiling_height
        gap = cfg.object_gap
        placed: list[tuple[float, float, float]] = []  # footprint circles (x, z, r)

        def place(radius: float) -> tuple[float, float] | None:
            lim_x, lim_z = hx - radius - gap, hz - radius - gap
            if lim_x <= 0 or lim_z <= 0:
                return None
            for _ in range(200):  # rejection sampling; deterministic given the generator
                x, z = float(rng.uniform(-lim_x, lim_x)), float(rng.uniform(-lim_z, lim_z))
                if all(math.hypot(x - px, z - pz) >= radius + pr + gap for px, pz, pr in placed):
                    placed.append((x, z, radius))
                    return x, z
            return None

        prims: list[Primitive] = []
        for _ in range(int(rng.integers(cfg.boxes_min, cfg.boxes_max + 1))):
            sx, sz = (float(v) for v in rng.uniform(0.2, 0.8, 2))
            h = float(min(rng.uniform(0.4, 2.4), height - 0.1))
            yaw = float(rng.uniform(0.0, 90.0))
            if (xz := place(math.hypot(sx, sz))) is not None:
                prims.append(Box(xz[0], xz[1], sx, sz, h, yaw))
        for _ in range(int(rng.integers(cfg.cylinders_min, cfg.cylinders_max + 1))):
            r = float(rng.uniform(0.15, 0.5))
            h = float(min(height, 4.0) if rng.random() < cfg.pillar_prob else rng.uniform(0.5, 2.0))
            if (xz := place(r)) is not None:
                prims.append(Cylinder(xz[0], xz[1], r, h))
        for _ in range(int(rng.integers(cfg.spheres_min, cfg.spheres_max + 1))):
            r = float(rng.uniform(0.2, 0.6))
            if (xz := place(r)) is not None:
                prims.append(Sphere(xz[0], xz[1], r))
        scene = Scene.build(hx, hz, height, prims, sky=sky, wall_height=cfg.wall_height,
                            fog_density=cfg.fog_density, seed=seed)
        return replace(scene, config=cfg)

    # ------------------------------------------------------------------------------------------
    # Queries

    @property
    def num_objects(self) -> int:
        return int(self.kind.shape[0])

    def kind_slice(self, kind: int) -> slice:
        """Rows of objects of ``kind`` (rows are sorted by kind)."""
        start = int((self.kind < kind).sum())
        return slice(start, start + int((self.kind == kind).sum()))

    def footprint_radius(self) -> Tensor:
        """Radius [N] of each object's footprint's bounding circle in the floor plane."""
        h = self.half.double()
        return torch.where(self.kind == BOX, torch.hypot(h[:, 0], h[:, 2]), h[:, 0])

    def free(self, points: Tensor, margin: float) -> Tensor:
        """bool [...]: True where a camera centre at ``points`` [..., 3] keeps ``margin`` from everything.

        Objects count as full-height obstacles (their inflated footprints), so the camera never
        passes through or over them; the room bounds count in all three axes.
        """
        p = torch.as_tensor(points, dtype=torch.float64)
        if p.shape[-1] != 3:
            raise ValueError(f"points must be [..., 3], got shape {tuple(p.shape)}")
        x, y, z = p.unbind(-1)
        ok = (x.abs() < self.half_x - margin) & (z.abs() < self.half_z - margin)
        ok &= (y < -margin) & (y > -self.height + margin)
        if self.num_objects == 0:
            return ok
        q = p[..., None, :] - self.center.double()  # [..., N, 3]
        cs, sn = torch.cos(self.yaw.double()), torch.sin(self.yaw.double())
        lx = cs * q[..., 0] - sn * q[..., 2]
        lz = sn * q[..., 0] + cs * q[..., 2]
        h = self.half.double()
        is_box = self.kind == BOX
        in_box = is_box & (lx.abs() < h[:, 0] + margin) & (lz.abs() < h[:, 2] + margin)
        in_round = ~is_box & (lx * lx + lz * lz < (h[:, 0] + margin) ** 2)
        return ok & ~(in_box | in_round).any(-1)

    def caption(self) -> str:
        """A short deterministic description (a text prompt for the clip)."""
        counts = [int((self.kind == k).sum()) for k in (BOX, CYLINDER, SPHERE)]
        names = ("box", "cylinder", "ball")
        parts = [f"{c} {n}{'es' if n == 'box' and c != 1 else ('s' if c != 1 else '')}" for c, n in zip(counts, names) if c]
        things = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "no objects"
        place = "a walled courtyard under a painted sky" if self.sky else "a room with a tiled ceiling"
        return (f"A synthetic world: {place}, about {2 * self.half_x:.0f} by {2 * self.half_z:.0f} metres, "
                f"with {things} in distinct colours and patterns.")

    def to(self, device: torch.device | str) -> "Scene":
        """The same scene with its tensors on ``device``."""
        return replace(
            self,
            kind=self.kind.to(device),
            center=self.center.to(device),
            half=self.half.to(device),
            yaw=self.yaw.to(device),
            materials=self.materials.to(device),
            light=self.light.to(device),
            fog_color=self.fog_color.to(device),
        )


def _draw_materials(rng: np.random.Generator, num_objects: int, sky: bool) -> tuple[Materials, Tensor, Tensor]:
    """Room + object materials, the light direction and the fog colour from ``rng``."""
    pattern: list[int] = []
    scale: list[float] = []
    angle: list[float] = []
    c1: list[list[float]] = []
    c2: list[list[float]] = []

    def add(p: int, s: float, a: float, col1: list[float], col2: list[float]) -> None:
        pattern.append(p)
        scale.append(s)
        angle.append(a)
        c1.append(col1)
        c2.append(col2)

    h0 = float(rng.random())
    # FLOOR: tiles with dark grout, low saturation.
    fh, fs, fv = float(rng.random()), float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.5, 0.7))
    add(TILES, float(rng.uniform(0.5, 1.0)), 0.0, _hsv(fh, fs, fv), _hsv(fh, fs, fv * 0.4))
    # SKY colours (used by the ceiling under an open sky and by SKY_MATERIAL).
    sh = float(rng.uniform(0.55, 0.62))
    horizon, zenith = _hsv(sh, float(rng.uniform(0.12, 0.3)), 0.97), _hsv(sh, float(rng.uniform(0.5, 0.7)), 0.85)
    cloud_scale = float(rng.uniform(2.0, 4.0))
    # CEILING
    if sky:
        add(SKY, cloud_scale, 0.0, horizon, zenith)
    else:
        cv = float(rng.uniform(0.75, 0.9))
        add(TILES, float(rng.uniform(0.6, 1.2)), 0.0, _hsv(h0, 0.05, cv), _hsv(h0, 0.05, cv * 0.6))
    # WALLS +x, -x, +z, -z: four distinct hues so that directions can be told apart.
    for k in range(4):
        hue = h0 + 0.25 * k + float(rng.uniform(-0.04, 0.04))
        s, v = float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.65, 0.85))
        style = int(rng.choice([BRICKS, TILES, STRIPES]))
        add(style, float(rng.uniform(0.3, 0.6)), 0.0, _hsv(hue, s, v), _hsv(hue, s, v * 0.5))
    add(SKY, cloud_scale, 0.0, horizon, zenith)  # SKY_MATERIAL
    # Objects: golden-ratio hue spacing gives every object its own colour.
    for i in range(num_objects):
        hue = h0 + 0.1 + 0.618034 * i
        s, v = float(rng.uniform(0.55, 0.95)), float(rng.uniform(0.6, 0.95))
        p = int(rng.choice([STRIPES, CHECKERS, BANDS, DOTS]))
        sc = float(rng.uniform(0.15, 0.4))
        a = math.radians(float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        second = _hsv(hue + 0.5, s, v) if rng.random() < 0.3 else _hsv(hue, s * 0.8, v * 0.5)
        add(p, sc, a, _hsv(hue, s, v), second)
    az, el = float(rng.uniform(0.0, 2 * math.pi)), math.radians(float(rng.uniform(35.0, 70.0)))
    light = torch.tensor([math.cos(el) * math.cos(az), -math.sin(el), math.cos(el) * math.sin(az)], dtype=torch.float32)
    fog = torch.tensor(_hsv(sh, 0.08, float(rng.uniform(0.75, 0.85))), dtype=torch.float32)
    materials = Materials(
        pattern=torch.tensor(pattern, dtype=torch.int64),
        scale=torch.tensor(scale, dtype=torch.float32),
        angle=torch.tensor(angle, dtype=torch.float32),
        color1=torch.tensor(c1, dtype=torch.float32),
        color2=torch.tensor(c2, dtype=torch.float32),
    )
    return materials, light, fog
