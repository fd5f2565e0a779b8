"""Surface attributes and colour of ray hits: normals, texture coordinates, patterns, light, fog.

Everything is per ray and deterministic. Texture coordinates (u, v) lie in the hit surface, in
the frame of the surface's owner (the object's own frame; the room's for walls, floor and ceiling),
so a pattern is keyed to its surface and moves with it. Normals and the light are compared in the
owner's frame (the light is pre-rotated per owner).

The room is shaded as a box seen from inside (its normals flipped), so one face rule serves
boxes and the room. Several scenes shade in one pass: their owner and material tables are
concatenated, and every per-scene constant (ambient light, fog, sky) is a column of the owner table,
so each ray reads its scene's values from the row it hit. Per-ray quantities are rows of [k, R] tensors, and branches are blended with
0/1 float masks rather than ``torch.where``: on CPU a float compare-and-multiply on contiguous
rows is several times cheaper than a boolean select, and every branch is finite for every ray,
so the blend is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

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
# Room face -> material is an affine function of the outward sign s along the face axis (see surface()).
assert (FLOOR, CEILING, WALL_PX, WALL_NX, WALL_PZ, WALL_NZ) == (0, 1, 2, 3, 4, 5)
_OWNER_COLUMNS = ("cx", "cy", "cz", "inv_hx", "inv_hy", "inv_hz", "radius", "cos", "sin",
                  "box_normal", "is_box", "is_cyl", "is_sph", "material", "light_x", "light_y", "light_z",
                  # per-scene constants, repeated on every owner row of the scene
                  "ambient", "fog_density", "fog_r", "fog_g", "fog_b", "sky", "wall_height", "sky_span", "material_offset")
_C = {name: i for i, name in enumerate(_OWNER_COLUMNS)}


@dataclass
class ShadingTables:
    """Surface owners [26, sum(N_s + 1)] and materials [10, sum(M_s)] of scenes s, for one gather each.

    Scene s owns owner rows ``owner_offset[s]`` .. + N_s (its objects, then its room). Owner rows:
    centre (3), 1 / half sizes (3), radius, cos / sin yaw, box normal sign (+1 box, -1 room, 0
    otherwise), is_box (room included), is_cylinder, is_sphere, material id within the scene (-1 for
    the room: chosen per face), the light direction in the owner's frame (3), then the scene's
    ambient light, fog density, fog colour (3), sky flag, wall height, sky span (height above the
    walls) and the offset of its materials in ``materials``. Material rows: pattern, 1 / scale,
    cos / sin angle, colour 1 (3), colour 2 (3). ``sky``: some scene has an open sky; ``fog``:
    "all", "none" or "some" of the scenes have fog (host flags: they choose which terms are computed).
    """

    owners: Tensor
    materials: Tensor
    owner_offset: Tensor  # int64 [S]
    sky: bool = False
    fog: str = "all"

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ShadingTables":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("owners", "materials", "owner_offset"):
            moved[name] = moved[name].to(device, non_blocking=non_blocking)
        return ShadingTables(**moved)


def _scene_tables(scene: Scene, material_offset: int) -> tuple[Tensor, Tensor]:
    """One scene's owner [26, N + 1] and material [10, M] tables, on the host (float32)."""
    scene = scene.to("cpu")
    n = scene.num_objects
    centre = torch.cat([scene.center, torch.tensor([[0.0, -scene.height / 2, 0.0]])])
    half = torch.cat([scene.half, torch.tensor([[scene.half_x, scene.height / 2, scene.half_z]])])
    yaw = torch.cat([scene.yaw, torch.zeros(1)])
    cs, sn = torch.cos(yaw), torch.sin(yaw)
    kind = torch.cat([scene.kind, torch.tensor([BOX])])
    is_box = (kind == BOX).float()
    box_normal = is_box.clone()
    box_normal[n] = -1.0  # the room is seen from inside
    material = torch.cat([torch.arange(n, dtype=torch.float32) + NUM_ROOM_MATERIALS, torch.tensor([-1.0])])
    lx, ly, lz = scene.light.unbind()
    const = torch.tensor([scene.ambient, scene.fog_density, *scene.fog_color.tolist(), float(scene.sky), scene.wall_height,
                          max(scene.height - scene.wall_height, 1e-6), float(material_offset)], dtype=torch.float32)
    owners = torch.cat([torch.stack([
        *centre.T, *(1.0 / half).T, half[:, 0], cs, sn, box_normal, is_box, (kind == CYLINDER).float(),
        (kind == SPHERE).float(), material, cs * lx - sn * lz, ly.expand(n + 1), sn * lx + cs * lz,
    ]), const[:, None].expand(-1, n + 1)])
    m = scene.materials
    mats = torch.stack([m.pattern.float(), 1.0 / m.scale, torch.cos(m.angle), torch.sin(m.angle), *m.color1.T, *m.color2.T])
    assert owners.shape[0] == len(_OWNER_COLUMNS)
    return owners, mats


def prepare(scenes: Scene | Sequence[Scene]) -> ShadingTables:
    """Pack one scene or several into host :class:`ShadingTables` (move them with ``.to(device)``).

    Each scene's rows are computed from that scene alone, so a scene's values are the same bits
    whatever else is packed with it.
    """
    scenes = [scenes] if isinstance(scenes, Scene) else list(scenes)
    if not scenes:
        raise ValueError("prepare: need at least one scene")
    owners, mats, offsets = [], [], []
    n_owner = n_mat = 0
    for scene in scenes:
        o, m = _scene_tables(scene, n_mat)
        offsets.append(n_owner)
        owners.append(o)
        mats.append(m)
        n_owner += o.shape[1]
        n_mat += m.shape[1]
    fogged = [s.fog_density > 0 for s in scenes]
    return ShadingTables(
        owners=torch.cat(owners, 1).contiguous(), materials=torch.cat(mats, 1).contiguous(),
        owner_offset=torch.tensor(offsets, dtype=torch.int64), sky=any(s.sky for s in scenes),
        fog="all" if all(fogged) else ("some" if any(fogged) else "none"),
    )


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


def surface(tables: ShadingTables, p: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-ray surface attributes of hit points ``p`` [3, R] on owner rows ``owner`` [R] of ``tables``.

    Returns the normal in the owner's frame [3, R] (towards the viewer's side), the light
    direction in the same frame [3, R], texture coordinates u, v [R], the material id within the
    owner's scene [R] (int64) and the gathered owner rows [26, R] (per-scene constants included).
    """
    g = tables.owners.index_select(1, owner)  # [26, R]
    qx, qy, qz = p[0] - g[0], p[1] - g[1], p[2] - g[2]
    ihx, ihy, ihz, radius, cs, sn = g[3], g[4], g[5], g[6], g[7], g[8]
    box_normal, is_box, is_cyl, is_sph, own_mat = g[9], g[10], g[11], g[12], g[13]
    # Owner frame (world-from-owner = rotation_y(yaw)).
    lx = cs * qx - sn * qz
    ly = qy
    lz = sn * qx + cs * qz
    sx, sy, sz = torch.sign(lx), torch.sign(ly), torch.sign(lz)
    # Box / room: the face is the axis where the point is relatively furthest out.
    rx, ry, rz = lx.abs() * ihx, ly.abs() * ihy, lz.abs() * ihz
    m0 = _ge(rx, ry).mul_(_ge(rx, rz))
    m1 = (1.0 - m0).mul_(_ge(ry, rz))
    m2 = 1.0 - m0 - m1
    # Cylinder: side or cap, whichever the point is relatively closer to.
    rho = torch.hypot(lx, lz).clamp_min_(1e-12)
    theta = torch.atan2(lz, lx)
    side = _ge(rho / radius, ry)
    radial = is_cyl * side / rho + is_sph / radius  # horizontal normal part of cylinder sides and spheres
    cap = is_cyl * (1.0 - side)
    normal = torch.stack([
        box_normal * m0 * sx + radial * lx,
        box_normal * m1 * sy + cap * sy + is_sph * ly / radius,
        box_normal * m2 * sz + radial * lz,
    ])
    # Texture coordinates: box faces x->(z, y), y->(x, z), z->(x, y); cylinder sides and spheres
    # (arc length, height); cylinder caps (x, z).
    arc = theta * radius
    u = is_box * (lx + m0 * (lz - lx)) + cap * lx + (is_cyl - cap + is_sph) * arc
    v = is_box * (ly + m1 * (lz - ly)) + cap * lz + (is_cyl - cap + is_sph) * ly
    # Room faces pick their material by side; under an open sky, walls above wall_height are sky
    # (the sky flag zeroes the term exactly for roofed scenes shaded alongside open ones).
    room = _lt(own_mat, 0.0)
    room_mat = m0 * (2.5 - 0.5 * sx) + m1 * (0.5 - 0.5 * sy) + m2 * (4.5 - 0.5 * sz)
    if tables.sky:
        sky = (m0 + m2).mul_(_lt(p[1], -g[_C["wall_height"]])).mul_(g[_C["sky"]])
        room_mat = room_mat + sky * (SKY_MATERIAL - room_mat)
    material = (own_mat + room * (room_mat - own_mat)).round_().long()
    return normal, g[14:17], u, v, material, g


def _tile_brightness(a: Tensor, b: Tensor, material: Tensor) -> Tensor:
    """Per-tile brightness in [0.88, 1.12] from an integer hash of tile indices (exact on every platform)."""
    h = torch.bitwise_xor(torch.bitwise_xor(a.long() * 73856093, b.long() * 19349663), material * 83492791)
    return 0.88 + 0.24 * (h & 1023).float() / 1023.0


def shade(tables: ShadingTables, o: Tensor, d: Tensor, t: Tensor, owner: Tensor) -> Tensor:
    """RGB in [0, 1], [Fc, P, 3], of rays o [Fc, 3] + t [Fc, P] * d [Fc, 3, P] that hit owner rows ``owner`` [Fc, P].

    Every ray is shaded from its own owner row and scene constants: a ray's colour does not depend
    on the other rays shaded with it (all ops are elementwise or gathers).
    """
    Fc, _, P = d.shape
    dr = d.transpose(0, 1).reshape(3, Fc * P)
    tr = t.reshape(-1)
    p = o.T.reshape(3, Fc, 1).expand(3, Fc, P).reshape(3, -1).addcmul(dr, tr)
    normal, light, u, v, material, g = surface(tables, p, owner.reshape(-1))
    mt = tables.materials.index_select(1, material + g[_C["material_offset"]].long())  # [10, R]
    pat = mt[0]
    us, vs = u * mt[1], v * mt[1]
    fu, fv = torch.floor(us), torch.floor(vs)
    w_dir = (mt[2] * us).addcmul_(mt[3], vs)
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
    if tables.sky:  # SKY: horizon -> zenith with height above the walls (only sky scenes use the pattern)
        patterns.append(((-p[1] - g[_C["wall_height"]]) / g[_C["sky_span"]]).clamp_(0.0, 1.0))
    else:
        patterns.append(torch.zeros_like(us))
    w = torch.gather(torch.stack(patterns), 0, pat.long()[None])  # [1, R]
    # Tiles and bricks vary in brightness per tile / brick (one hash of the cell index for both).
    is_bricks, tiled = _eq(pat, float(BRICKS)), _eq(pat, float(TILES)).add_(_eq(pat, float(BRICKS)))
    bright = (_tile_brightness(fu + is_bricks * (fb - fu), fv, material) - 1.0).mul_(tiled).add_(1.0)
    c1 = mt[4:7]
    color = c1.addcmul(mt[7:10] - c1, w).mul_(bright)  # [3, R]
    diffuse = (normal[0] * light[0] + normal[1] * light[1] + normal[2] * light[2]).clamp_min_(0.0)
    ambient = g[_C["ambient"]]
    lit = ambient + (1.0 - ambient) * diffuse
    if tables.sky:  # soft clouds; the sky glows (no diffuse term). is_sky is 0 off the sky: exact no-ops there
        is_sky = _eq(pat, float(SKY))
        swirl = torch.sin(us + 1.7 * torch.sin(0.8 * vs)) * torch.sin(1.1 * vs + 1.3 * torch.sin(0.6 * us))
        cloud = ((swirl - 0.3) * 2.5).clamp_(0.0, 1.0).mul_(is_sky)
        color = color + (1.0 - color) * (0.8 * cloud)
        lit = lit + is_sky * (1.0 - lit)
    color = color * lit
    if tables.fog != "none":
        fog = g[_C["fog_r"] : _C["fog_b"] + 1]
        dist = (dr[0] * dr[0] + dr[1] * dr[1] + dr[2] * dr[2]).sqrt_().mul_(tr)
        keep = torch.exp(dist.mul_(-g[_C["fog_density"]]))
        fogged = fog + (color - fog) * keep
        # fog + (c - fog) * 1 is not exactly c: scenes without fog keep their colour by selection.
        color = fogged if tables.fog == "all" else torch.where(g[_C["fog_density"]] > 0, fogged, color)
    return color.clamp_(0.0, 1.0).T.reshape(Fc, P, 3)
