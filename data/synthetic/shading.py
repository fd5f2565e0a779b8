"""Surface attributes and colour of ray hits: normals, texture coordinates, patterns, light, fog.

Everything is per ray and deterministic. Texture coordinates (u, v) lie in the hit surface, in
the frame of the surface's owner (the object's own frame; the room's for walls, floor and ceiling),
so a pattern is keyed to its surface and moves with it.

The room is shaded as a box seen from inside (its normals flipped), so one face rule serves
boxes and the room. Branches are blended with 0/1 float masks rather than ``torch.where``:
on CPU a float compare-and-multiply is several times cheaper than a boolean select, and every
branch is finite for every ray, so the blend is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from data.synthetic.scene import (
    BOX,
    BRICKS,
    CEILING,
    CYLINDER,
    FLOOR,
    NUM_ROOM_MATERIALS,
    SKY,
    SKY_MATERIAL,
    SPHERE,
    TILES,
    WALL_NX,
    WALL_NZ,
    WALL_PX,
    WALL_PZ,
    Scene,
)

__all__ = ["ShadingTables", "prepare", "surface", "shade"]

_GROUT = 0.06  # grout line width as a fraction of a tile
# Room face -> material as an affine function of the outward sign s along the face axis.
assert (WALL_PX, WALL_NX, FLOOR, CEILING, WALL_PZ, WALL_NZ) == (2, 3, 0, 1, 4, 5)


@dataclass
class ShadingTables:
    """Per-row surface owners [N + 1, 13] (objects, then the room) and materials [M, 10], packed for one gather each.

    Owner columns: centre (3), half sizes (3), cos / sin yaw, is_box, is_cylinder, is_sphere,
    normal sign (+1 objects, -1 room), material id (-1 for the room: chosen per face).
    Material columns: pattern, scale, cos / sin angle, colour 1 (3), colour 2 (3).
    """

    owners: Tensor
    materials: Tensor


def prepare(scene: Scene) -> ShadingTables:
    """Pack ``scene`` (already on the target device) into :class:`ShadingTables`."""
    n = scene.num_objects
    k = scene.kind
    obj = torch.cat(
        [
            scene.center,
            scene.half,
            torch.cos(scene.yaw)[:, None],
            torch.sin(scene.yaw)[:, None],
            torch.stack([k == BOX, k == CYLINDER, k == SPHERE], dim=1).float(),
            torch.ones(n, 1, device=k.device),
            (torch.arange(n, device=k.device, dtype=torch.float32) + NUM_ROOM_MATERIALS)[:, None],
        ],
        dim=1,
    )
    room = torch.tensor(
        [[0.0, -scene.height / 2, 0.0, scene.half_x, scene.height / 2, scene.half_z, 1.0, 0.0, 1.0, 0.0, 0.0, -1.0, -1.0]],
        device=k.device,
    )
    m = scene.materials
    mats = torch.cat(
        [m.pattern.float()[:, None], m.scale[:, None], torch.cos(m.angle)[:, None], torch.sin(m.angle)[:, None], m.color1, m.color2],
        dim=1,
    )
    return ShadingTables(owners=torch.cat([obj, room]), materials=mats)


def _ge(a: Tensor, b: Tensor | float) -> Tensor:
    """Float 0/1 mask of a >= b."""
    return torch.ge(a, b, out=torch.empty_like(a))


def _lt(a: Tensor, b: Tensor | float) -> Tensor:
    """Float 0/1 mask of a < b."""
    return torch.lt(a, b, out=torch.empty_like(a))


def _eq(a: Tensor, b: float) -> Tensor:
    """Float 0/1 mask of a == b."""
    return torch.eq(a, b, out=torch.empty_like(a))


def _mod2(x: Tensor) -> Tensor:
    """x mod 2 for integral-valued floats (cheaper than torch.remainder on CPU)."""
    return x - 2.0 * torch.floor(0.5 * x)


def surface(scene: Scene, tables: ShadingTables, p: Tensor, row: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal [R, 3] (world, towards the viewer's side), texture coords u, v [R] and material id [R] (int64).

    ``p`` [R, 3] are hit points and ``row`` [R] the owners hit (object rows, ``num_objects`` = room).
    """
    g = tables.owners.index_select(0, row)
    qx, qy, qz = (p[:, i] - g[:, i] for i in range(3))
    hx, hy, hz, cs, sn = g[:, 3], g[:, 4], g[:, 5], g[:, 6], g[:, 7]
    is_box, is_cyl, is_sph, nsign, own_mat = g[:, 8], g[:, 9], g[:, 10], g[:, 11], g[:, 12]
    # Owner frame (world-from-owner = rotation_y(yaw)).
    lx = cs * qx - sn * qz
    ly = qy
    lz = sn * qx + cs * qz
    sx, sy, sz = torch.sign(lx), torch.sign(ly), torch.sign(lz)
    # Box / room: the face is the axis where the point is relatively furthest out.
    rx, ry, rz = lx.abs() / hx, ly.abs() / hy, lz.abs() / hz
    m0 = _ge(rx, ry) * _ge(rx, rz)
    m1 = (1.0 - m0) * _ge(ry, rz)
    m2 = 1.0 - m0 - m1
    u_box = lx + m0 * (lz - lx)  # x-face: (z, y); y-face: (x, z); z-face: (x, y)
    v_box = ly + m1 * (lz - ly)
    # Cylinder: side or cap, whichever the point is relatively closer to.
    rho = torch.hypot(lx, lz).clamp_min_(1e-12)
    theta = torch.atan2(lz, lx)
    side = _ge(rho / hx, ly.abs() / hy)
    u_cyl = lx + side * (theta * hx - lx)
    v_cyl = lz + side * (ly - lz)
    # Blend the owner kinds (spheres: radial normal, (arc length, height) coordinates).
    wb = is_box * nsign
    ws = is_cyl * side / rho + is_sph / hx  # radial part shared by cylinder sides and spheres
    nx = wb * m0 * sx + ws * lx
    ny = wb * m1 * sy + is_cyl * (1.0 - side) * sy + is_sph * ly / hx
    nz = wb * m2 * sz + ws * lz
    u = is_box * u_box + is_cyl * u_cyl + is_sph * theta * hx
    v = is_box * v_box + is_cyl * v_cyl + is_sph * ly
    normal = torch.stack([cs * nx + sn * nz, ny, cs * nz - sn * nx], dim=1)
    # Room faces pick their material by side; under an open sky, walls above wall_height are sky.
    room = _lt(own_mat, 0.0)
    room_mat = m0 * (2.5 - 0.5 * sx) + m1 * (0.5 - 0.5 * sy) + m2 * (4.5 - 0.5 * sz)
    if scene.sky:
        sky = m0.add(m2).mul_(_lt(p[:, 1], -scene.wall_height))
        room_mat = room_mat + sky * (SKY_MATERIAL - room_mat)
    material = (own_mat + room * (room_mat - own_mat)).round_().long()
    return normal, u, v, material


def _tile_brightness(a: Tensor, b: Tensor, material: Tensor) -> Tensor:
    """Per-tile brightness in [0.88, 1.12] from an integer hash of tile indices (exact on every platform)."""
    h = torch.bitwise_xor(torch.bitwise_xor(a.long() * 73856093, b.long() * 19349663), material * 83492791)
    return 0.88 + 0.24 * (h & 1023).float() / 1023.0


def shade(scene: Scene, tables: ShadingTables, o: Tensor, d: Tensor, t: Tensor, row: Tensor) -> Tensor:
    """RGB in [0, 1], [Fc, P, 3], of rays o [Fc, 3] + t [Fc, P] * d [Fc, 3, P] that hit owner ``row`` [Fc, P]."""
    Fc, _, P = d.shape
    dr = d.transpose(1, 2).reshape(Fc * P, 3)
    tr = t.reshape(-1)
    p = torch.addcmul(o[:, None, :], d.transpose(1, 2), t[..., None]).reshape(Fc * P, 3)
    normal, u, v, material = surface(scene, tables, p, row.reshape(-1))
    mt = tables.materials.index_select(0, material)
    pat, s, ca, sa = mt[:, 0], mt[:, 1], mt[:, 2], mt[:, 3]
    c1, c2 = mt[:, 4:7], mt[:, 7:10]
    us, vs = u / s, v / s
    fu, fv = torch.floor(us), torch.floor(vs)
    w_dir = ca * us + sa * vs
    du, dv = us - fu - 0.5, vs - fv - 0.5
    bu = 0.5 * us + 0.5 * _mod2(fv)  # bricks: twice as wide as tall, rows offset by half a brick
    fb = torch.floor(bu)
    line_v = _lt(vs - fv, _GROUT)
    patterns = [
        _mod2(torch.floor(w_dir)),  # STRIPES
        _mod2(fu + fv),  # CHECKERS
        0.5 - 0.5 * torch.cos((2 * math.pi) * w_dir),  # BANDS
        _lt(du * du + dv * dv, 0.09),  # DOTS
        torch.maximum(_lt(us - fu, _GROUT), line_v),  # TILES (grout lines)
        torch.maximum(_lt(bu - fb, 0.5 * _GROUT), line_v),  # BRICKS (mortar lines)
    ]
    if scene.sky:  # SKY: horizon -> zenith with height above the walls
        span = max(scene.height - scene.wall_height, 1e-6)
        patterns.append(((-p[:, 1] - scene.wall_height) / span).clamp_(0.0, 1.0))
    else:
        patterns.append(torch.zeros_like(us))
    w = torch.gather(torch.stack(patterns, dim=1), 1, pat.long()[:, None])
    is_tiles, is_bricks = _eq(pat, float(TILES)), _eq(pat, float(BRICKS))
    bright = 1.0 + is_tiles * (_tile_brightness(fu, fv, material) - 1.0) + is_bricks * (_tile_brightness(fb, fv, material) - 1.0)
    color = c1.addcmul(c2 - c1, w).mul_(bright[:, None])
    diffuse = (normal @ scene.light).clamp_min_(0.0)
    lit = scene.ambient + (1.0 - scene.ambient) * diffuse
    if scene.sky:  # soft clouds; the sky glows (no diffuse term)
        is_sky = _eq(pat, float(SKY))
        swirl = torch.sin(us + 1.7 * torch.sin(0.8 * vs)) * torch.sin(1.1 * vs + 1.3 * torch.sin(0.6 * us))
        cloud = ((swirl - 0.3) * 2.5).clamp_(0.0, 1.0) * is_sky
        color = color + (1.0 - color) * (0.8 * cloud[:, None])
        lit = lit + is_sky * (1.0 - lit)
    color = color * lit[:, None]
    if scene.fog_density > 0:
        keep = torch.exp(-scene.fog_density * tr * dr.norm(dim=1))[:, None]
        color = scene.fog_color + (color - scene.fog_color) * keep
    return color.clamp_(0.0, 1.0).view(Fc, P, 3)
