"""Surface attributes and colour of ray hits: normals, texture coordinates, patterns, light, fog.

Everything is per ray (flat [R] tensors) and deterministic. Texture coordinates (u, v) lie in
the hit surface, in the surface owner's frame (world for the room, the object's frame for an
object), so a pattern is keyed to its surface and moves with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from data.synthetic.scene import (
    BANDS,
    BOX,
    BRICKS,
    CEILING,
    CHECKERS,
    CYLINDER,
    DOTS,
    FLOOR,
    NUM_ROOM_MATERIALS,
    SKY,
    SKY_MATERIAL,
    STRIPES,
    TILES,
    WALL_NX,
    WALL_NZ,
    WALL_PX,
    WALL_PZ,
    Scene,
)

__all__ = ["surface", "shade"]

_GROUT = 0.06  # grout line width as a fraction of a tile


def _face_uv(axis: Tensor, x: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """In-plane coordinates of a face whose normal is along ``axis``: x->(z, y), y->(x, z), z->(x, y)."""
    u = torch.where(axis == 0, z, x)
    v = torch.where(axis == 1, z, y)
    return u, v


def surface(scene: Scene, p: Tensor, d: Tensor, obj: Tensor, axis: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal [R, 3] (world, facing the camera side), texture coords u, v [R] and material id [R].

    ``p`` [R, 3] are hit points, ``d`` [R, 3] ray directions, ``obj`` [R] the object row hit (-1 for
    the room) and ``axis`` [R] the room face axis (used where obj == -1).
    """
    px, py, pz = p.unbind(-1)
    # Room: the ray leaves the box through the face on the side of sign(d[axis]).
    sgn = torch.sign(torch.gather(d, 1, axis[:, None]))[:, 0]
    n_room = torch.zeros_like(p).scatter_(1, axis[:, None], -sgn[:, None])
    u_room, v_room = _face_uv(axis, px, py, pz)
    pos = sgn > 0
    m_room = torch.where(
        axis == 1,
        torch.where(pos, FLOOR, CEILING),
        torch.where(axis == 0, torch.where(pos, WALL_PX, WALL_NX), torch.where(pos, WALL_PZ, WALL_NZ)),
    )
    if scene.sky:
        m_room = torch.where((axis != 1) & (py < -scene.wall_height), SKY_MATERIAL, m_room)
    if scene.num_objects == 0:
        return n_room, u_room, v_room, m_room

    # Objects, in their own frame (world-from-object = rotation_y(yaw)).
    oid = obj.clamp(min=0)
    kind = scene.kind[oid]
    q = p - scene.center[oid]
    h = scene.half[oid]
    yaw = scene.yaw[oid]
    cs, sn = torch.cos(yaw), torch.sin(yaw)
    lx = cs * q[:, 0] - sn * q[:, 2]
    ly = q[:, 1]
    lz = sn * q[:, 0] + cs * q[:, 2]
    local = torch.stack([lx, ly, lz], dim=-1)
    # Box: the face is the axis where the point is relatively furthest out.
    bax = (local.abs() / h).argmax(-1)
    n_box = torch.zeros_like(local).scatter_(1, bax[:, None], torch.sign(torch.gather(local, 1, bax[:, None])))
    u_box, v_box = _face_uv(bax, lx, ly, lz)
    # Cylinder: side or cap, whichever the point is relatively closer to.
    rho = torch.hypot(lx, lz).clamp_min(1e-12)
    theta = torch.atan2(lz, lx)
    side = rho / h[:, 0] >= ly.abs() / h[:, 1]
    zero = torch.zeros_like(lx)
    n_cyl = torch.where(side[:, None], torch.stack([lx / rho, zero, lz / rho], -1), torch.stack([zero, torch.sign(ly), zero], -1))
    u_cyl = torch.where(side, theta * h[:, 0], lx)
    v_cyl = torch.where(side, ly, lz)
    # Sphere
    n_sph = local / h[:, :1]
    u_sph, v_sph = theta * h[:, 0], ly

    is_box, is_cyl = (kind == BOX)[:, None], (kind == CYLINDER)[:, None]
    n_loc = torch.where(is_box, n_box, torch.where(is_cyl, n_cyl, n_sph))
    u_obj = torch.where(kind == BOX, u_box, torch.where(kind == CYLINDER, u_cyl, u_sph))
    v_obj = torch.where(kind == BOX, v_box, torch.where(kind == CYLINDER, v_cyl, v_sph))
    n_obj = torch.stack([cs * n_loc[:, 0] + sn * n_loc[:, 2], n_loc[:, 1], -sn * n_loc[:, 0] + cs * n_loc[:, 2]], -1)

    hit_obj = obj >= 0
    normal = torch.where(hit_obj[:, None], n_obj, n_room)
    u = torch.where(hit_obj, u_obj, u_room)
    v = torch.where(hit_obj, v_obj, v_room)
    material = torch.where(hit_obj, obj + NUM_ROOM_MATERIALS, m_room)
    return normal, u, v, material


def _tile_brightness(a: Tensor, b: Tensor, material: Tensor) -> Tensor:
    """Per-tile brightness in [0.88, 1.12] from an integer hash of the tile indices (exact, platform-independent)."""
    h = torch.bitwise_xor(torch.bitwise_xor(a.long() * 73856093, b.long() * 19349663), material * 83492791)
    return 0.88 + 0.24 * (h & 1023).float() / 1023.0


def shade(scene: Scene, o: Tensor, d: Tensor, t: Tensor, obj: Tensor, axis: Tensor) -> Tensor:
    """Linear RGB in [0, 1], [R, 3], of rays o + t d (``o`` [R, 3], ``d`` [R, 3]) that hit ``obj`` / room ``axis``."""
    p = o + t[:, None] * d
    normal, u, v, material = surface(scene, p, d, obj, axis)
    mats = scene.materials
    pat = mats.pattern[material]
    s = mats.scale[material]
    ang = mats.angle[material]
    us, vs = u / s, v / s
    fu, fv = torch.floor(us), torch.floor(vs)
    w_dir = torch.cos(ang) * us + torch.sin(ang) * vs
    stripes = torch.remainder(torch.floor(w_dir), 2.0)
    checkers = torch.remainder(fu + fv, 2.0)
    bands = 0.5 - 0.5 * torch.cos(2 * math.pi * w_dir)
    du, dv = us - fu - 0.5, vs - fv - 0.5
    dots = (du * du + dv * dv < 0.09).float()
    tiles = ((us - fu < _GROUT) | (vs - fv < _GROUT)).float()
    bu = 0.5 * us + 0.5 * torch.remainder(fv, 2.0)  # bricks: twice as wide as tall, rows offset by half
    fb = torch.floor(bu)
    bricks = ((bu - fb < _GROUT / 2) | (vs - fv < _GROUT)).float()
    # Sky: vertical gradient (horizon -> zenith) plus soft clouds.
    lift = ((-p[:, 1] - scene.wall_height) / max(scene.height - scene.wall_height, 1e-6)).clamp(0.0, 1.0)
    swirl = torch.sin(us + 1.7 * torch.sin(0.8 * vs)) * torch.sin(1.1 * vs + 1.3 * torch.sin(0.6 * us))
    cloud = ((swirl - 0.3) * 2.5).clamp(0.0, 1.0)

    weights = torch.stack([stripes, checkers, bands, dots, tiles, bricks, lift], dim=-1)
    w = torch.gather(weights, 1, pat[:, None])
    bright = torch.where(
        pat == TILES, _tile_brightness(fu, fv, material), torch.where(pat == BRICKS, _tile_brightness(fb, fv, material), 1.0)
    )
    c1, c2 = mats.color1[material], mats.color2[material]
    color = (c1 + (c2 - c1) * w) * bright[:, None]
    is_sky = pat == SKY
    color = torch.where(is_sky[:, None], color + (1.0 - color) * (0.8 * cloud[:, None]), color)
    diffuse = (normal @ scene.light).clamp_min(0.0)
    lit = torch.where(is_sky, 1.0, scene.ambient + (1.0 - scene.ambient) * diffuse)  # the sky glows
    color = color * lit[:, None]
    if scene.fog_density > 0:
        keep = torch.exp(-scene.fog_density * t * d.norm(dim=-1))[:, None]
        color = scene.fog_color + (color - scene.fog_color) * keep
    return color.clamp(0.0, 1.0)


# The patterns are indexed by id in `weights` above; keep the ids in that order.
assert (STRIPES, CHECKERS, BANDS, DOTS, TILES, BRICKS, SKY) == tuple(range(7))
