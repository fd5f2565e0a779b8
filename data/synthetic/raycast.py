"""Vectorised ray casting of a :class:`~data.synthetic.scene.Scene` through pinhole cameras.

One ray per pixel through the pixel centre (the continuous-coordinate convention of
``data.geometry``: pixel (i, j) is at (j + 0.5, i + 0.5)). Rays are ``d = R K^-1 [u, v, 1]``, not
normalised: their camera-frame z component is 1, so the ray parameter ``t`` of a hit *is* its
z-depth, the quantity ``data.geometry.project`` returns.

Frames go through in blocks. Objects whose bounding sphere misses every view frustum of a block
are culled; every ray of the block is then intersected with every remaining object at once, one
tensor expression per object kind, laid out [frames, objects, pixels] so that reductions over
objects run along contiguous pixels. On CPU, boolean masks and ``torch.where`` cost several times
an arithmetic op, so misses are pushed to a huge distance arithmetically, and the nearest hit is
found with one integer ``amin`` over distances whose low bits carry the object's position.
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.synthetic.scene import BOX, CYLINDER, SPHERE, Scene
from data.synthetic.shading import prepare, shade

__all__ = ["render", "camera_rays", "frustum_planes", "visible_rows", "trace"]

_BIG = 1e30  # "missed": pushed this far (times the miss margin) beyond any real hit


def camera_rays(K: Tensor, height: int, width: int) -> Tensor:
    """Camera-frame ray directions [..., 3, H*W] (float32, z = 1) of pixel centres for K [..., 3, 3]."""
    Kinv = torch.linalg.inv(K.double())
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=K.device) + 0.5,
        torch.arange(width, dtype=torch.float64, device=K.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(height * width, dtype=torch.float64, device=K.device)])
    return (Kinv @ pix).float()


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
    """Boxes (centres c [Nb, 3], half sizes h [Nb, 3], yaw cos/sin [Nb]): slab-method hits [Fc, Nb, P] into ``out``."""
    cs, sn = cs[:, None], sn[:, None]  # [Nb, 1]
    q = o[:, None, :] - c  # [Fc, Nb, 3] camera relative to the box centre
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    dx, dz = d[:, 0:1], d[:, 2:3]  # [Fc, 1, P]
    hx, hy, hz = h[:, 0:1], h[:, 1:2], h[:, 2:3]
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
    """Vertical cylinders (h = r, h/2, r): the infinite cylinder's interval within the y slab, [Fc, Nc, P] into ``out``."""
    q = o[:, None, :] - c
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    r, hy = h[:, 0:1], h[:, 1:2]
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
    """Spheres (radius h[:, 0]): the nearer root of the ray/sphere quadratic, [Fc, Ns, P] into ``out``."""
    r = h[:, 0:1]
    q = o[:, None, :] - c
    qx, qy, qz = q[..., 0:1], q[..., 1:2], q[..., 2:3]
    dx, dy, dz = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    a = dx * dx + dy * dy + dz * dz
    b = (dx * qx).addcmul_(dy, qy).addcmul_(dz, qz)
    disc = (b * b).addcmul_(a, (q * q).sum(-1, keepdim=True) - r * r, value=-1.0)
    miss = disc.clamp_max(0.0)
    sq = disc.clamp_min_(1e-30).sqrt_()
    near = b.add_(sq).mul_(-a.reciprocal_())
    near.sub_(miss, alpha=_BIG)
    _hit(near, near, out)


def _room(scene: Scene, o: Tensor, d: Tensor, out: Tensor) -> None:
    """Exit distance [Fc, 1, P] from inside the room box into ``out``."""
    half = torch.tensor([scene.half_x, scene.height / 2, scene.half_z], dtype=d.dtype, device=d.device)
    centre = torch.tensor([0.0, -scene.height / 2, 0.0], dtype=d.dtype, device=d.device)
    q = (o - centre)[:, :, None]  # [Fc, 3, 1]
    # Distance to the face on d's side: (half - q sign(d)) / |d|; d == 0 gives +inf.
    t = (half[:, None] - q * torch.sign(d)).div_(d.abs())  # [Fc, 3, P]
    torch.amin(t, dim=1, keepdim=True, out=out)


def frustum_planes(K: Tensor, height: int, width: int) -> Tensor:
    """Inward unit normals [..., 4, 3] (camera frame) of the four side planes of the view frustum of K [..., 3, 3]."""
    corners = torch.tensor([[0.0, 0.0, 1.0], [width, 0.0, 1.0], [width, height, 1.0], [0.0, height, 1.0]],
                           dtype=torch.float64, device=K.device)
    c = corners @ torch.linalg.inv(K.double()).transpose(-1, -2)  # [..., 4, 3] corner rays
    n = torch.linalg.cross(c, c.roll(-1, dims=-2), dim=-1)
    inward = torch.sign((n * c.mean(-2, keepdim=True)).sum(-1, keepdim=True))
    return (n * inward / n.norm(dim=-1, keepdim=True)).float()


def visible_rows(scene: Scene, o: Tensor, R: Tensor, planes: Tensor) -> Tensor:
    """Object rows [V] whose bounding sphere meets the frustum of any camera (o [Fc, 3], R [Fc, 3, 3]).

    Conservative culling: a row left out cannot be hit by any ray of these cameras.
    """
    radius = scene.half.norm(dim=-1)  # bounds boxes and cylinders (h = r, h/2, r); spheres exactly
    radius = torch.where(scene.kind == SPHERE, scene.half[:, 0], radius)
    cam = (scene.center[None] - o[:, None, :]) @ R  # [Fc, N, 3]: w2c rotation is R^T
    side = (cam @ planes.transpose(-1, -2)).amin(-1)  # [Fc, N] nearest side-plane distance
    seen = (side > -radius) & (cam[..., 2] > -radius)
    return seen.any(0).nonzero()[:, 0]


def trace(scene: Scene, o: Tensor, d: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Nearest hit of rays ``o`` [Fc, 3] + t ``d`` [Fc, 3, P] against the scene (objects ``rows``, default all).

    Returns t [Fc, P] (the z-depth when d has camera z = 1) and the row hit [Fc, P] (int64):
    an object row, or ``scene.num_objects`` for the room.
    """
    Fc, _, P = d.shape
    if rows is None:
        rows = torch.arange(scene.num_objects, device=d.device)
    n = int(rows.shape[0])
    buf = torch.empty(Fc, n + 1, P, dtype=d.dtype, device=d.device)
    _room(scene, o, d, buf[:, n : n + 1])
    inv_dy = d[:, 1:2].reciprocal()
    kinds = scene.kind[rows]
    start = 0
    for kind in (BOX, CYLINDER, SPHERE):  # one vectorised test per object kind (rows are sorted by kind)
        stop = start + int((kinds == kind).sum())
        if stop == start:
            continue
        sel = rows[start:stop]
        c, h, out = scene.center[sel], scene.half[sel], buf[:, start:stop]
        if kind == BOX:
            yaw = scene.yaw[sel]
            _boxes(c, h, torch.cos(yaw), torch.sin(yaw), o, d, inv_dy, out)
        elif kind == CYLINDER:
            _cylinders(c, h, o, d, inv_dy, out)
        else:
            _spheres(c, h, o, d, out)
        start = stop
    if n == 0:
        return buf[:, 0], torch.full((Fc, P), scene.num_objects, dtype=torch.int64, device=d.device)
    # argmin over rows: positive float32 order equals int32 order, so write the row index into the
    # low bits, take the integer min, read the row back and gather the exact distance.
    bits = n.bit_length()
    low = (1 << bits) - 1
    idx = torch.arange(n + 1, dtype=torch.int32, device=d.device)[None, :, None]
    key = (buf.view(torch.int32) & ~low).bitwise_or_(idx).amin(dim=1, keepdim=True)
    pos = (key & low).long()
    owner = torch.cat([rows, rows.new_tensor([scene.num_objects])])  # position -> scene row (last: room)
    return torch.gather(buf, 1, pos)[:, 0], owner[pos[:, 0]]


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
) -> tuple[Tensor, Tensor]:
    """Render frames of ``scene`` seen by cameras c2w [F, 4, 4] (OpenCV) with intrinsics K [3, 3] or [F, 3, 3].

    Returns RGB uint8 [F, H, W, 3] and z-depth float32 [F, H, W], on c2w's device. Cameras must be
    inside the room and outside every object (the trajectories guarantee it). Frames are traced
    in blocks of about ``trace_rays`` rays (the [frames, objects, pixels] temporaries stay in
    cache) and shaded in blocks of about ``shade_rays`` (per-ray ops large enough to use threads).
    The defaults are 32k / 128k rays on a CPU and 2M / 4M on a GPU (few, large kernels).

    ``supersample`` s > 1 casts s x s rays per pixel and box-filters them (colour averaged in float,
    depth averaged): a camera integrates light over its pixel's area, so textures finer than a pixel
    blend instead of aliasing, and sub-pixel motion changes intensities smoothly.
    """
    _check_inputs(c2w, K, height, width)
    if supersample < 1:
        raise ValueError(f"render: supersample must be >= 1, got {supersample}")
    if supersample > 1:
        up = torch.diag(torch.tensor([supersample, supersample, 1.0], dtype=K.dtype, device=K.device))
        rgb, depth = render(scene, c2w, up @ K, height * supersample, width * supersample,
                            trace_rays=trace_rays, shade_rays=shade_rays)
        F = rgb.shape[0]
        pool = lambda t: t.reshape(F, height, supersample, width, supersample, -1).mean(dim=(2, 4))  # noqa: E731
        return pool(rgb.float()).round_().to(torch.uint8), pool(depth[..., None])[..., 0]
    device = c2w.device
    gpu = device.type != "cpu"
    trace_rays = trace_rays or (1 << 21 if gpu else 32768)
    shade_rays = shade_rays or (1 << 22 if gpu else 131072)
    scene = scene.to(device)
    tables = prepare(scene)
    F, P = c2w.shape[0], height * width
    rays = camera_rays(K.to(device), height, width)  # [3, P] or [F, 3, P]
    planes = frustum_planes(K.to(device), height, width)  # [4, 3] or [F, 4, 3]
    R = c2w[:, :3, :3].float()
    origin = c2w[:, :3, 3].float()
    rgb = torch.empty(F, P, 3, dtype=torch.uint8, device=device)
    depth = torch.empty(F, P, dtype=torch.float32, device=device)
    row = torch.empty(F, P, dtype=torch.int64, device=device)
    sub = max(1, trace_rays // P)
    block = max(sub, shade_rays // P // sub * sub)
    for f0 in range(0, F, block):  # cache blocking over frames; all work inside is vectorised
        f1 = min(F, f0 + block)
        d = R[f0:f1] @ (rays if rays.ndim == 2 else rays[f0:f1])  # [Fb, 3, P] world directions
        for s0 in range(f0, f1, sub):
            s1 = min(f1, s0 + sub)
            o, ds = origin[s0:s1], d[s0 - f0 : s1 - f0]
            rows = visible_rows(scene, o, R[s0:s1], planes if planes.ndim == 2 else planes[s0:s1])
            depth[s0:s1], row[s0:s1] = trace(scene, o, ds, rows)
        color = shade(scene, tables, origin[f0:f1], d, depth[f0:f1], row[f0:f1])  # [Fb, P, 3]
        rgb[f0:f1] = color.mul_(255.0).round_().to(torch.uint8)
    return rgb.view(F, height, width, 3), depth.view(F, height, width)
