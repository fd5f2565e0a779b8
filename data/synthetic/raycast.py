"""Vectorised ray casting of :class:`~data.synthetic.scene.Scene` s through pinhole cameras.

One ray per pixel through the pixel centre (the continuous-coordinate convention of
``data.geometry``: pixel (i, j) is at (j + 0.5, i + 0.5)). Rays are ``d = R K^-1 [u, v, 1]``, not
normalised: their camera-frame z component is 1, so the ray parameter ``t`` of a hit *is* its
z-depth, the quantity ``data.geometry.project`` returns.

:func:`render_batch` renders the frames of several scenes in one launch sequence (each frame
names its scene; the clips of a dataset batch go through together); :func:`render` is the batch
of one scene. Frames go through in blocks. Culling is per frame and on the host (no device
sync): each frame tests only the objects whose bounding sphere meets its view frustum, padded
per block and object kind to the block's largest count with dead entries (NaN parameters,
always a miss). Every ray of the block is intersected with its frame's objects at once, one
tensor expression per object kind, laid out [frames, objects, pixels] so that reductions over
objects run along contiguous pixels. On CPU, boolean masks and ``torch.where`` cost several times
an arithmetic op, so misses are pushed to a huge distance arithmetically, and the nearest hit is
found with one integer ``amin`` over distances whose low bits carry the object's row in its scene.

Bit-exactness: a frame's pixels depend only on its own scene, camera and K, never on the other
frames or scenes rendered with it. Per-scene values are computed from that scene alone; per-pixel
work is elementwise ops and exact selections (min, gather), never a matmul or a sum whose order
could change with the batch; the key's low-bit width depends on the scene's object count. So a
clip rendered alone or inside any batch gives the same bytes on the same device. On CPU this also
needs whole SIMD vectors (PyTorch evaluates sin, atan2, exp ... of a vector's remainder with scalar
libm, which may differ in the last bit): each frame's rays are padded to a multiple of 64, and it
holds with one torch thread (more threads split loops at arbitrary points).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from data.synthetic.scene import BOX, CYLINDER, SPHERE, Scene
from data.synthetic.shading import ShadingTables, prepare, shade

__all__ = ["render", "render_batch", "SceneBatch", "pack_scenes", "camera_rays", "frustum_planes", "visible_objects", "trace"]

_BIG = 1e30  # "missed": pushed this far (times the miss margin) beyond any real hit
_RAY_ALIGN = 64  # rays per frame are padded to a multiple of this (whole SIMD vectors on CPU)
_KINDS = (BOX, CYLINDER, SPHERE)


def _inverse3(K: Tensor) -> Tensor:
    """Inverse of K [..., 3, 3] in float64 by cofactors (elementwise: the same bits whatever the batch)."""
    k = K.double()
    a, b, c = k[..., 0, 0], k[..., 0, 1], k[..., 0, 2]
    d, e, f = k[..., 1, 0], k[..., 1, 1], k[..., 1, 2]
    g, h, i = k[..., 2, 0], k[..., 2, 1], k[..., 2, 2]
    A, B, C = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * A + b * B + c * C
    if not bool((det != 0).all()):
        raise ValueError("render: K is singular")
    adj = torch.stack([
        torch.stack([A, c * h - b * i, b * f - c * e], -1),
        torch.stack([B, a * i - c * g, c * d - a * f], -1),
        torch.stack([C, b * g - a * h, a * e - b * d], -1),
    ], -2)
    return adj / det[..., None, None]


def _padded(p: int) -> int:
    return -(-p // _RAY_ALIGN) * _RAY_ALIGN


def camera_rays(Kinv: Tensor, height: int, width: int) -> Tensor:
    """Camera-frame ray directions [..., 3, P'] (float32, z = 1) of pixel centres for K^-1 [..., 3, 3] (float64).

    P' is H*W rounded up to a multiple of 64; the extra rays repeat pixel 0's (they are cropped).
    """
    dev = Kinv.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=dev) + 0.5,
        torch.arange(width, dtype=torch.float64, device=dev) + 0.5,
        indexing="ij",
    )
    u, v = u.reshape(-1), v.reshape(-1)
    P = height * width
    if _padded(P) > P:
        u = torch.cat([u, u[:1].expand(_padded(P) - P)])
        v = torch.cat([v, v[:1].expand(_padded(P) - P)])
    rays = Kinv[..., :, 0:1] * u + Kinv[..., :, 1:2] * v + Kinv[..., :, 2:3]
    return rays.float()


def _hit(near: Tensor, far: Tensor, out: Tensor) -> Tensor:
    """``near`` where the interval [near, far] is a hit in front of the camera, else >= 1e30-ish; into ``out``.

    near + BIG * (relu(near - far) + relu(-near)): an empty interval or one starting behind the
    camera (cameras are outside objects, so that means the object is behind) becomes a miss.
    """
    pen = (near - far).clamp_min_(0.0)
    pen.sub_(near.clamp_max(0.0))
    return torch.nan_to_num(near.add_(pen, alpha=_BIG), nan=_BIG, out=out)


def _slab(inv: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry / exit distances of a slab lo <= o + t d <= hi (lo, hi relative to o) given 1/d."""
    t1 = inv * lo
    t2 = inv * hi
    return torch.minimum(t1, t2), torch.maximum(t1, t2, out=t1)


def _boxes(c: Tensor, h: Tensor, cs: Tensor, sn: Tensor, o: Tensor, d: Tensor, inv_dy: Tensor, out: Tensor) -> None:
    """Boxes (per frame: centres c [Fc, Nb, 3], half sizes h [Fc, Nb, 3], yaw cos/sin [Fc, Nb, 1]): slab-method hits [Fc, Nb, P] into ``out``."""
    q = o[:, None, :] - c  # [Fc, Nb, 3] camera relative to the box centre
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    dx, dz = d[:, 0:1], d[:, 2:3]  # [Fc, 1, P]
    hx, hy, hz = h[..., 0:1], h[..., 1:2], h[..., 2:3]
    # Local x axis of box n in world is (cs, 0, -sn), local z axis is (sn, 0, cs).
    inv_x = (dx * cs).sub_(dz * sn).reciprocal_()
    ox = cs * qx - sn * qz
    near, far = _slab(inv_x, -hx - ox, hx - ox)
    inv_z = (dx * sn).add_(dz * cs).reciprocal_()
    oz = sn * qx + cs * qz
    nz, fz = _slab(inv_z, -hz - oz, hz - oz)
    torch.maximum(near, nz, out=near)
    torch.minimum(far, fz, out=far)
    ny, fy = _slab(inv_dy, -hy - qy, hy - qy)
    torch.maximum(near, ny, out=near)
    torch.minimum(far, fy, out=far)
    _hit(near, far, out)


def _cylinders(c: Tensor, h: Tensor, o: Tensor, d: Tensor, inv_dy: Tensor, out: Tensor) -> None:
    """Vertical cylinders (per frame, h = r, h/2, r): the infinite cylinder's interval within the y slab, [Fc, Nc, P] into ``out``."""
    q = o[:, None, :] - c
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    r, hy = h[..., 0:1], h[..., 1:2]
    dx, dz = d[:, 0:1], d[:, 2:3]
    a = dx * dx + dz * dz  # [Fc, 1, P]
    b = (dx * qx).addcmul_(dz, qz)  # [Fc, Nc, P]
    disc = (b * b).addcmul_(a, qx * qx + qz * qz - r * r, value=-1.0)
    miss = disc.clamp_max(0.0)  # < 0 where the line misses the circle
    sq = disc.clamp_min_(1e-30).sqrt_()  # (sqrt of exact zeros is slow on CPU)
    inv_a = a.reciprocal_()
    near = torch.add(b, sq).mul_(-inv_a)
    far = sq.sub_(b).mul_(inv_a)
    ny, fy = _slab(inv_dy, -hy - qy, hy - qy)
    torch.maximum(near, ny, out=near)
    torch.minimum(far, fy, out=far)
    near.sub_(miss, alpha=_BIG)
    _hit(near, far, out)


def _spheres(c: Tensor, h: Tensor, o: Tensor, d: Tensor, out: Tensor) -> None:
    """Spheres (per frame, radius h[..., 0]): the nearer root of the ray/sphere quadratic, [Fc, Ns, P] into ``out``."""
    r = h[..., 0:1]
    q = o[:, None, :] - c
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    dx, dy, dz = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    a = dx * dx + dy * dy + dz * dz
    b = (dx * qx).addcmul_(dy, qy).addcmul_(dz, qz)
    disc = (b * b).addcmul_(a, qx * qx + qy * qy + qz * qz - r * r, value=-1.0)
    miss = disc.clamp_max(0.0)
    sq = disc.clamp_min_(1e-30).sqrt_()
    near = b.add_(sq).mul_(-a.reciprocal_())
    near.sub_(miss, alpha=_BIG)
    _hit(near, near, out)


def _room(room: Tensor, o: Tensor, d: Tensor, out: Tensor) -> None:
    """Exit distance [Fc, 1, P] from inside each frame's room box (room [Fc, 6]: centre, half sizes) into ``out``."""
    q = (o - room[:, :3])[:, :, None]  # [Fc, 3, 1]
    # Distance to the face on d's side: (half - q sign(d)) / |d|; d == 0 gives +inf.
    t = (room[:, 3:, None] - q * torch.sign(d)).div_(d.abs())  # [Fc, 3, P]
    torch.amin(t, dim=1, keepdim=True, out=out)


def frustum_planes(Kinv: Tensor, height: int, width: int) -> Tensor:
    """Inward unit normals [..., 4, 3] (camera frame, float64) of the four side planes of the view frustum of K^-1 [..., 3, 3]."""
    x = torch.tensor([0.0, width, width, 0.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, height, height], dtype=torch.float64)
    c = (Kinv[..., None, :, 0] * x[:, None] + Kinv[..., None, :, 1] * y[:, None] + Kinv[..., None, :, 2])  # [..., 4, 3]
    n = torch.linalg.cross(c, c.roll(-1, dims=-2), dim=-1)
    mean = c.mean(-2, keepdim=True)
    inward = torch.sign(n[..., 0:1] * mean[..., 0:1] + n[..., 1:2] * mean[..., 1:2] + n[..., 2:3] * mean[..., 2:3])
    norm = (n[..., 0:1] ** 2 + n[..., 1:2] ** 2 + n[..., 2:3] ** 2).sqrt()
    return n * inward / norm


@dataclass
class SceneBatch:
    """Several scenes' objects as one table, for one launch sequence (host tensors; ``to`` moves them).

    ``objects`` [n + 1, 8]: centre (3), half sizes (3), cos / sin yaw of every object of every
    scene (scene s's rows from ``first[s]``, sorted by kind as in the scene), then one dead row of
    NaN (a padding entry that is always a miss). ``room`` [S, 6]: room centre and half sizes.
    ``low`` [S] int32: the low key bits that carry a row index of scene s, 2^bit_length(N_s) - 1.
    Host only: ``first`` [S], ``kinds`` (per scene, objects of each kind), ``bound`` [n, 4] float64
    (bounding sphere: centre, radius, for culling).
    """

    objects: Tensor
    room: Tensor
    low: Tensor
    tables: ShadingTables
    first: list[int]
    kinds: list[tuple[int, int, int]]
    bound: Tensor

    @property
    def num_scenes(self) -> int:
        return len(self.first)

    def to(self, device: torch.device | str) -> "SceneBatch":
        """Device copies of the tensors the kernels read (asynchronous from pinned memory on CUDA)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("objects", "room", "low"):
            moved[name] = _to_device(moved[name], device)
        moved["tables"] = ShadingTables(**{**{f.name: getattr(self.tables, f.name) for f in fields(self.tables)},
                                         **{k: _to_device(getattr(self.tables, k), device) for k in ("owners", "materials", "owner_offset")}})
        return SceneBatch(**moved)


def _to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``; a host -> CUDA copy goes through pinned memory without waiting for the device."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pack_scenes(scenes: Sequence[Scene]) -> SceneBatch:
    """Pack ``scenes`` into a host :class:`SceneBatch` (every value computed from its own scene alone)."""
    if len(scenes) == 0:
        raise ValueError("pack_scenes: need at least one scene")
    rows, rooms, lows, first, kinds, bounds = [], [], [], [], [], []
    n = 0
    for scene in scenes:
        sc = scene.to("cpu")
        N = sc.num_objects
        first.append(n)
        n += N
        kinds.append(tuple(int((sc.kind == k).sum()) for k in _KINDS))
        if sc.kind.tolist() != sorted(sc.kind.tolist()):
            raise ValueError("pack_scenes: scene rows must be sorted by kind (Scene.build does this)")
        rows.append(torch.cat([sc.center, sc.half, torch.cos(sc.yaw)[:, None], torch.sin(sc.yaw)[:, None]], 1))
        rooms.append([0.0, -sc.height / 2, 0.0, sc.half_x, sc.height / 2, sc.half_z])
        lows.append((1 << N.bit_length()) - 1)
        h = sc.half.double()
        radius = torch.where(sc.kind == SPHERE, h[:, 0], (h * h).sum(-1).sqrt())  # bounds boxes and cylinders (h = r, h/2, r)
        bounds.append(torch.cat([sc.center.double(), radius[:, None]], 1))
    objects = torch.cat([*rows, torch.full((1, 8), float("nan"))]).float().contiguous()
    return SceneBatch(
        objects=objects, room=torch.tensor(rooms, dtype=torch.float32), low=torch.tensor(lows, dtype=torch.int32),
        tables=prepare(scenes), first=first, kinds=kinds, bound=torch.cat(bounds).reshape(-1, 4),
    )


def visible_objects(batch: SceneBatch, sid: Tensor, o: Tensor, R: Tensor, planes: Tensor) -> Tensor:
    """bool [F, n]: object j (a row of ``batch.objects``) may be hit by a ray of frame f (of scene sid [F]).

    Host, float64, elementwise (the same answer for a frame whatever the others): an object is kept
    when its bounding sphere (inflated by 0.1 % + 1 mm against rounding) meets the frame's frustum
    (o [F, 3], R [F, 3, 3] camera-to-world, planes [4, 3] or [F, 4, 3] inward normals). Conservative:
    an object left out cannot be hit by any ray of that frame. Objects of other scenes are False.
    """
    F, n = int(sid.shape[0]), int(batch.bound.shape[0])
    owner = torch.repeat_interleave(torch.arange(batch.num_scenes), torch.tensor([sum(k) for k in batch.kinds]))
    mine = owner[None, :] == sid[:, None]  # [F, n]
    if n == 0:
        return mine
    rel = batch.bound[None, :, :3] - o.double()[:, None, :]  # [F, n, 3]
    Rd = R.double()
    # Camera coordinates: cam_j = sum_i R_ij (p_i - o_i), written out (no matmul).
    cam = [rel[..., 0] * Rd[:, None, 0, j] + rel[..., 1] * Rd[:, None, 1, j] + rel[..., 2] * Rd[:, None, 2, j] for j in range(3)]
    pl = planes.double().expand(F, 4, 3) if planes.ndim == 2 else planes.double()
    side = torch.stack([cam[0] * pl[:, None, k, 0] + cam[1] * pl[:, None, k, 1] + cam[2] * pl[:, None, k, 2]
                        for k in range(4)], -1).amin(-1)  # [F, n] nearest side-plane distance
    r = batch.bound[None, :, 3] * 1.001 + 1e-3
    return mine & (side > -r) & (cam[2] > -r)


@dataclass
class _FrameObjects:
    """Per frame, per kind: the frame's visible objects (rows of ``SceneBatch.objects``), visible first in row order.

    ``index[k]`` [F, w_k] int64 (dead entries: the NaN row), ``key_row[k]`` [F, w_k] int32 (row in
    the frame's scene; dead: the room's), ``scatter_row[k]`` [F, w_k] int64 (dead: a spare column),
    ``count[k]`` [F] (host) the visible count, ``room_row`` [F] int32 (= N_s) and ``rows`` (max N_s + 2).
    """

    index: list[Tensor]
    key_row: list[Tensor]
    scatter_row: list[Tensor]
    count: list[Tensor]
    room_row: Tensor
    rows: int


def _frame_objects(batch: SceneBatch, sid: Tensor, visible: Tensor) -> _FrameObjects:
    """Host: sort each frame's visible objects to the front of its row of each kind (see :class:`_FrameObjects`)."""
    F = int(sid.shape[0])
    n = int(batch.bound.shape[0])
    num = torch.tensor([sum(k) for k in batch.kinds])
    first = torch.tensor(batch.first)
    rows = int(num.max()) + 2  # local rows 0..N_s (room) and a spare column for dead entries
    kind = torch.cat([torch.repeat_interleave(torch.arange(3), torch.tensor(k)) for k in batch.kinds]) if n else torch.zeros(0, dtype=torch.long)
    local = torch.arange(n) - torch.repeat_interleave(first, num)
    room_row = num[sid]
    out = _FrameObjects([], [], [], [], room_row.to(torch.int32), rows)
    for k in range(3):
        cols = (kind == k).nonzero()[:, 0]  # rows of kind k (all scenes), ascending
        vis = visible[:, cols]  # [F, c]
        count = vis.sum(1)
        w = int(count.max()) if F and cols.numel() else 0
        order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :w]  # visible first, in row order
        live = torch.arange(w)[None, :] < count[:, None]
        glob = cols[order]
        out.index.append(torch.where(live, glob, n))
        out.key_row.append(torch.where(live, local[glob], room_row[:, None]).to(torch.int32))
        out.scatter_row.append(torch.where(live, local[glob], rows - 1))
        out.count.append(count)
    return out


def trace(batch: SceneBatch, sid: Tensor, o: Tensor, d: Tensor, objects: list[tuple[Tensor, Tensor, Tensor]],
          room_row: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Nearest hit of rays ``o`` [Fc, 3] + t ``d`` [Fc, 3, P] of frames showing scenes ``sid`` [Fc] of ``batch`` (on d's device).

    ``objects``: per kind (box, cylinder, sphere), the frame's entries as (index [Fc, m] into
    ``batch.objects``, key row [Fc, m] int32, scatter row [Fc, m] int64); ``room_row`` [Fc] int32;
    ``rows`` the columns of the row -> position table. Returns t [Fc, P] (the z-depth when d has
    camera z = 1) and the row hit [Fc, P] (int64): a row of the frame's scene, or N_s for the room.
    """
    Fc, _, P = d.shape
    m = [int(idx.shape[1]) for idx, _, _ in objects]
    n = sum(m)
    buf = torch.empty(Fc, n + 1, P, dtype=d.dtype, device=d.device)
    _room(batch.room.index_select(0, sid), o, d, buf[:, n : n + 1])
    inv_dy = d[:, 1:2].reciprocal()
    start = 0
    for kind, (idx, _, _), mk in zip(_KINDS, objects, m):  # one vectorised test per object kind
        if mk == 0:
            continue
        g = batch.objects.index_select(0, idx.reshape(-1)).view(Fc, mk, 8)
        c, h, out = g[..., 0:3], g[..., 3:6], buf[:, start : start + mk]
        if kind == BOX:
            _boxes(c, h, g[..., 6:7], g[..., 7:8], o, d, inv_dy, out)
        elif kind == CYLINDER:
            _cylinders(c, h, o, d, inv_dy, out)
        else:
            _spheres(c, h, o, d, out)
        start += mk
    # argmin over entries: positive float32 order equals int32 order, so write the row (in the
    # frame's scene) into the low bits, take the integer min, read the row back and gather the
    # exact distance. The low-bit width is the scene's, so ties resolve the same in any batch.
    low = batch.low.index_select(0, sid)[:, None, None]
    key_row = torch.cat([*(kr for _, kr, _ in objects), room_row[:, None]], 1)[:, :, None]
    key = (buf.view(torch.int32) & ~low).bitwise_or_(key_row).amin(dim=1)  # [Fc, P]
    row = (key & low[:, 0]).long()
    # position of each row of the frame's scene among the entries (dead entries write a spare column)
    scatter = torch.cat([*(sr for _, _, sr in objects), room_row[:, None].long()], 1)
    pos_of_row = torch.zeros(Fc, rows, dtype=torch.int64, device=d.device).scatter_(
        1, scatter, torch.arange(n + 1, device=d.device).expand(Fc, n + 1).contiguous())
    pos = torch.gather(pos_of_row, 1, row)
    return torch.gather(buf, 1, pos[:, None])[:, 0], row


def _check_inputs(c2w: Tensor, K: Tensor, height: int, width: int) -> None:
    if not isinstance(c2w, Tensor) or c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"render: c2w must be a tensor [F, 4, 4], got {getattr(c2w, 'shape', type(c2w))}")
    if not isinstance(K, Tensor) or K.shape[-2:] != (3, 3) or K.ndim not in (2, 3):
        raise ValueError(f"render: K must be a tensor [3, 3] or [F, 3, 3], got {getattr(K, 'shape', type(K))}")
    if K.ndim == 3 and K.shape[0] != c2w.shape[0]:
        raise ValueError(f"render: K has {K.shape[0]} frames but c2w has {c2w.shape[0]}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"render: height and width must be >= 1, got {height}x{width}")
    if not bool(torch.isfinite(c2w).all()):
        raise ValueError("render: c2w contains NaN or inf")


def render(
    scene: Scene,
    c2w: Tensor,
    K: Tensor,
    height: int,
    width: int,
    *,
    trace_rays: int | None = None,
    shade_rays: int | None = None,
    supersample: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Render frames of ``scene`` seen by cameras c2w [F, 4, 4] (OpenCV) with intrinsics K [3, 3] or [F, 3, 3].

    Returns RGB uint8 [F, H, W, 3] and z-depth float32 [F, H, W], on ``device`` (default: c2w's).
    Cameras must be inside the room and outside every object (the trajectories guarantee it).
    The batch of one scene: see :func:`render_batch` for the arguments; the result is the same
    bytes as these frames inside any batch on the same device.
    """
    return render_batch([scene], c2w, K, height, width, trace_rays=trace_rays, shade_rays=shade_rays,
                        supersample=supersample, device=device)


def render_batch(
    scenes: Sequence[Scene],
    c2w: Tensor,
    K: Tensor,
    height: int,
    width: int,
    *,
    scene_index: Tensor | Sequence[int] | None = None,
    trace_rays: int | None = None,
    shade_rays: int | None = None,
    supersample: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Render frames of several scenes in one launch sequence: frame f shows ``scenes[scene_index[f]]``.

    c2w [F, 4, 4] (OpenCV camera-to-world), K [3, 3] or [F, 3, 3], ``scene_index`` [F] (default:
    all 0). Returns RGB uint8 [F, H, W, 3] and z-depth float32 [F, H, W] on ``device`` (default:
    c2w's device). Poses, intrinsics and culling are read on the host; the kernels never wait for
    the device (on CUDA the call returns once everything is queued). Each frame's bytes are those of
    rendering it alone (see the module docstring).

    Frames are traced in blocks of about ``trace_rays`` rays (the [frames, objects, pixels]
    temporaries stay in cache) and shaded in blocks of about ``shade_rays`` (per-ray ops large
    enough to use threads). The defaults are 32k / 128k rays on a CPU and 2M / 4M on a GPU (few,
    large kernels). ``supersample`` s > 1 casts s x s rays per pixel and box-filters them (colour
    averaged in float, depth averaged): a camera integrates light over its pixel's area, so textures
    finer than a pixel blend instead of aliasing, and sub-pixel motion changes intensities smoothly.
    """
    scenes = list(scenes)
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise ValueError(f"render: scenes must be a non-empty sequence of Scene, got {[type(s).__name__ for s in scenes]}")
    _check_inputs(c2w, K, height, width)
    if int(supersample) < 1:
        raise ValueError(f"render: supersample must be >= 1, got {supersample}")
    F = int(c2w.shape[0])
    if scene_index is None:
        sid = torch.zeros(F, dtype=torch.int64)
    else:
        sid = torch.as_tensor(scene_index, dtype=torch.int64).cpu()
        if sid.shape != (F,):
            raise ValueError(f"render: scene_index must have one entry per frame ({F}), got shape {tuple(sid.shape)}")
        if F and (int(sid.min()) < 0 or int(sid.max()) >= len(scenes)):
            raise ValueError(f"render: scene_index must lie in [0, {len(scenes)}), got [{int(sid.min())}, {int(sid.max())}]")
    device = torch.device(device) if device is not None else c2w.device
    gpu = device.type != "cpu"
    trace_rays = trace_rays or (1 << 21 if gpu else 32768)
    shade_rays = shade_rays or (1 << 22 if gpu else 131072)
    s = int(supersample)
    Hs, Ws = height * s, width * s
    # Host: poses, K^-1 (K scaled for supersampling: diag(s, s, 1) K), culling.
    pose = c2w.detach().cpu()
    R, origin = pose[:, :3, :3].float(), pose[:, :3, 3].float()
    scale = torch.tensor([s, s, 1.0], dtype=torch.float64)[:, None]
    Kinv = _inverse3(K.detach().cpu().double() * scale)
    batch = pack_scenes(scenes)
    visible = visible_objects(batch, sid, origin, R, frustum_planes(Kinv, Hs, Ws))
    objs = _frame_objects(batch, sid, visible)
    # Device: everything the kernels read, queued without waiting.
    dev_batch = batch.to(device)
    R_d, o_d, sid_d = _to_device(R, device), _to_device(origin, device), _to_device(sid, device)
    index = [_to_device(t, device) for t in objs.index]
    key_row = [_to_device(t, device) for t in objs.key_row]
    scatter_row = [_to_device(t, device) for t in objs.scatter_row]
    room_row = _to_device(objs.room_row, device)
    Kinv_d = _to_device(Kinv, device)
    rays = camera_rays(Kinv_d, Hs, Ws) if Kinv.ndim == 2 else None  # [3, P'] shared, else per block
    P = Hs * Ws
    Pp = _padded(P)
    rgb = torch.empty(F, P, 3, dtype=torch.uint8, device=device)
    depth = torch.empty(F, P, dtype=torch.float32, device=device)
    sub = max(1, trace_rays // Pp)
    block = max(sub, shade_rays // Pp // sub * sub)
    for f0 in range(0, F, block):  # cache blocking over frames; all work inside is vectorised
        f1 = min(F, f0 + block)
        r = rays if rays is not None else camera_rays(Kinv_d[f0:f1], Hs, Ws)  # [3, P'] or [Fb, 3, P']
        Rb = R_d[f0:f1]
        d = Rb[:, :, 0:1] * r[..., 0:1, :] + Rb[:, :, 1:2] * r[..., 1:2, :] + Rb[:, :, 2:3] * r[..., 2:3, :]  # [Fb, 3, P'] world
        t = torch.empty(f1 - f0, Pp, dtype=torch.float32, device=device)
        row = torch.empty(f1 - f0, Pp, dtype=torch.int64, device=device)
        for s0 in range(f0, f1, sub):
            s1 = min(f1, s0 + sub)
            entries = []
            for k in range(3):  # this block's entries: up to its frames' largest visible count
                mk = int(objs.count[k][s0:s1].max()) if objs.index[k].shape[1] else 0
                entries.append((index[k][s0:s1, :mk], key_row[k][s0:s1, :mk], scatter_row[k][s0:s1, :mk]))
            t[s0 - f0 : s1 - f0], row[s0 - f0 : s1 - f0] = trace(
                dev_batch, sid_d[s0:s1], o_d[s0:s1], d[s0 - f0 : s1 - f0], entries, room_row[s0:s1], objs.rows)
        owner = row + dev_batch.tables.owner_offset.index_select(0, sid_d[f0:f1])[:, None]
        color = shade(dev_batch.tables, o_d[f0:f1], d, t, owner)  # [Fb, P', 3]
        rgb[f0:f1] = color[:, :P].mul_(255.0).round_().to(torch.uint8)
        depth[f0:f1] = t[:, :P]
    if s == 1:
        return rgb.view(F, height, width, 3), depth.view(F, height, width)
    # Box filter over each pixel's s x s rays, summed slice by slice in a fixed order.
    rgb6 = rgb.view(F, height, s, width, s, 3)
    dep5 = depth.view(F, height, s, width, s)
    acc_rgb = torch.zeros(F, height, width, 3, dtype=torch.float32, device=device)
    acc_dep = torch.zeros(F, height, width, dtype=torch.float32, device=device)
    for a in range(s):
        for b in range(s):
            acc_rgb += rgb6[:, :, a, :, b]
            acc_dep += dep5[:, :, a, :, b]
    return acc_rgb.div_(s * s).round_().to(torch.uint8), acc_dep.div_(s * s)
