"""Vectorised ray casting of a :class:`~data.synthetic.scene.Scene` through pinhole cameras.

One ray per pixel through the pixel centre (the continuous-coordinate convention of
``data.geometry``: pixel (i, j) is at (j + 0.5, i + 0.5)). Rays are ``d = R K^-1 [u, v, 1]``, not
normalised: their camera-frame z component is 1, so the ray parameter ``t`` of a hit *is* its
z-depth, the quantity ``data.geometry.project`` returns. Each ray is intersected with the room
(interior of a box) and every object at once (one tensor op per object kind); frames are
processed in blocks of about ``chunk_rays`` rays so the [rays, objects] temporaries stay in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.synthetic.scene import BOX, CYLINDER, SPHERE, Scene
from data.synthetic.shading import shade

__all__ = ["render", "camera_rays", "trace"]

_INF = float("inf")


def camera_rays(K: Tensor, height: int, width: int) -> Tensor:
    """Camera-frame ray directions [..., H*W, 3] (float32, z = 1) of pixel centres for K [..., 3, 3]."""
    Kinv = torch.linalg.inv(K.double())
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=K.device) + 0.5,
        torch.arange(width, dtype=torch.float64, device=K.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    return (pix @ Kinv.transpose(-1, -2)).float()


def _room(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Exit distance [Fc, P] from inside the room box and the axis [Fc, P] of the face it leaves through."""
    lo = torch.tensor([-scene.half_x, -scene.height, -scene.half_z], dtype=d.dtype, device=d.device)
    hi = torch.tensor([scene.half_x, 0.0, scene.half_z], dtype=d.dtype, device=d.device)
    bound = torch.where(d > 0, hi, lo)
    # |bound - o| / |d|: the face lies on d's side, and d == 0 gives +inf rather than a signed zero's -inf.
    t_axes = (bound - o[:, None, :]).abs_().div_(d.abs())
    return t_axes.min(dim=-1)


def _y_slab(o_y: Tensor, inv_dy: Tensor, y_lo: Tensor, y_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit distances [Fc, P, N] of the slabs y in [y_lo, y_hi] ([N]) for rays with 1/d_y [Fc, P, 1]."""
    t1 = inv_dy * (y_lo - o_y[:, None])[:, None, :]
    t2 = inv_dy * (y_hi - o_y[:, None])[:, None, :]
    return torch.minimum(t1, t2), torch.maximum(t1, t2)


def _boxes(scene: Scene, rows: slice, o: Tensor, d: Tensor, inv_dy: Tensor) -> Tensor:
    """Hit distance [Fc, P, Nb] of boxes (slab method in each box's frame); inf where missed."""
    c, h, yaw = scene.center[rows], scene.half[rows], scene.yaw[rows]
    n = c.shape[0]
    cs, sn = torch.cos(yaw), torch.sin(yaw)
    zero = torch.zeros_like(cs)
    # Columns project a world vector onto each box's local x axis, then onto its local z axis.
    axes = torch.cat([torch.stack([cs, zero, -sn]), torch.stack([sn, zero, cs])], dim=1)  # [3, 2Nb]
    inv = (d @ axes).reciprocal_()  # [Fc, P, 2Nb]
    q = o[:, None, :] - c  # [Fc, Nb, 3]
    o_loc = torch.cat([cs * q[..., 0] - sn * q[..., 2], sn * q[..., 0] + cs * q[..., 2]], dim=-1)  # [Fc, 2Nb]
    hh = torch.cat([h[:, 0], h[:, 2]])
    t1 = inv * (-hh - o_loc)[:, None, :]
    t2 = inv.mul_((hh - o_loc)[:, None, :])
    tmin = torch.minimum(t1, t2)
    tmax = torch.maximum(t1, t2, out=t1)
    near = torch.maximum(tmin[..., :n], tmin[..., n:])
    far = torch.minimum(tmax[..., :n], tmax[..., n:])
    ty_min, ty_max = _y_slab(o[:, 1], inv_dy, c[:, 1] - h[:, 1], c[:, 1] + h[:, 1])
    near = torch.maximum(near, ty_min, out=near)
    far = torch.minimum(far, ty_max, out=far)
    # The camera is never inside an object, so a hit in front has near > 0.
    return near.masked_fill_(~((near <= far) & (near > 0)), _INF)


def _cylinders(scene: Scene, rows: slice, o: Tensor, d: Tensor, inv_dy: Tensor) -> Tensor:
    """Hit distance [Fc, P, Nc] of vertical cylinders: (infinite-cylinder interval) within the y slab."""
    c, h = scene.center[rows], scene.half[rows]
    q = o[:, None, :] - c  # [Fc, Nc, 3]
    q_xz = q.clone()
    q_xz[..., 1] = 0.0
    b = d @ q_xz.transpose(1, 2)  # [Fc, P, Nc]: d_xz . q_xz
    a = d[..., 0:1] ** 2 + d[..., 2:3] ** 2  # [Fc, P, 1]
    cc = (q_xz * q_xz).sum(-1) - h[:, 0] ** 2  # [Fc, Nc]
    sq = torch.addcmul(b * b, a, cc[:, None, :], value=-1.0).sqrt_()  # NaN where the line misses
    inv_a = a.reciprocal()
    t0 = (-b - sq).mul_(inv_a)
    t1 = (sq - b).mul_(inv_a)
    ty_min, ty_max = _y_slab(o[:, 1], inv_dy, c[:, 1] - h[:, 1], c[:, 1] + h[:, 1])
    near = torch.maximum(t0, ty_min, out=t0)  # NaN propagates, and NaN compares False below
    far = torch.minimum(t1, ty_max, out=t1)
    return near.masked_fill_(~((near <= far) & (near > 0)), _INF)


def _spheres(scene: Scene, rows: slice, o: Tensor, d: Tensor) -> Tensor:
    """Hit distance [Fc, P, Ns] of spheres (nearer root of the ray/sphere quadratic); inf where missed."""
    c, r = scene.center[rows], scene.half[rows, 0]
    q = o[:, None, :] - c  # [Fc, Ns, 3]
    b = d @ q.transpose(1, 2)  # [Fc, P, Ns]
    a = (d * d).sum(-1, keepdim=True)
    cc = (q * q).sum(-1) - r * r
    sq = torch.addcmul(b * b, a, cc[:, None, :], value=-1.0).sqrt_()
    t0 = (-b - sq).div_(a)
    return t0.masked_fill_(~(t0 > 0), _INF)


def trace(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest hit of rays ``o`` [Fc, 3] + t ``d`` [Fc, P, 3] against the whole scene.

    Returns t [Fc, P] (the z-depth when d has camera z = 1), the object row hit [Fc, P] (-1: the
    room) and the room face axis [Fc, P] (0 x-walls, 1 floor/ceiling, 2 z-walls).
    """
    t, axis = _room(scene, o, d)
    obj = torch.full_like(axis, -1)
    inv_dy = d[..., 1:2].reciprocal()
    for kind in (BOX, CYLINDER, SPHERE):  # one vectorised test per object kind
        rows = scene.kind_slice(kind)
        if rows.stop == rows.start:
            continue
        if kind == BOX:
            tk = _boxes(scene, rows, o, d, inv_dy)
        elif kind == CYLINDER:
            tk = _cylinders(scene, rows, o, d, inv_dy)
        else:
            tk = _spheres(scene, rows, o, d)
        t_near, idx = tk.min(dim=-1)
        closer = t_near < t
        t = torch.where(closer, t_near, t)
        obj = torch.where(closer, idx + rows.start, obj)
    return t, obj, axis


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
    scene: Scene, c2w: Tensor, K: Tensor, height: int, width: int, *, chunk_rays: int = 16384
) -> tuple[Tensor, Tensor]:
    """Render frames of ``scene`` seen by cameras c2w [F, 4, 4] (OpenCV) with intrinsics K [3, 3] or [F, 3, 3].

    Returns RGB uint8 [F, H, W, 3] and z-depth float32 [F, H, W], on c2w's device. Cameras must be
    inside the room and outside every object (trajectories guarantee it).
    """
    _check_inputs(c2w, K, height, width)
    device = c2w.device
    scene = scene.to(device)
    F, P = c2w.shape[0], height * width
    rays = camera_rays(K.to(device), height, width)  # [P, 3] or [F, P, 3]
    if rays.ndim == 2:
        rays = rays[None]
    R = c2w[:, :3, :3].float()
    origin = c2w[:, :3, 3].float()
    rgb = torch.empty(F, P, 3, dtype=torch.uint8, device=device)
    depth = torch.empty(F, P, dtype=torch.float32, device=device)
    block = max(1, chunk_rays // P)
    for f0 in range(0, F, block):  # cache blocking over frames; all work inside is vectorised
        f1 = min(F, f0 + block)
        cam = rays if rays.shape[0] == 1 else rays[f0:f1]
        d = cam @ R[f0:f1].transpose(1, 2)  # [Fc, P, 3] world directions
        o = origin[f0:f1]
        t, obj, axis = trace(scene, o, d)
        n = (f1 - f0) * P
        color = shade(scene, o[:, None, :].expand(-1, P, -1).reshape(n, 3), d.reshape(n, 3), t.reshape(n),
                      obj.reshape(n), axis.reshape(n))
        rgb[f0:f1] = (color * 255.0).round_().to(torch.uint8).view(f1 - f0, P, 3)
        depth[f0:f1] = t
    return rgb.view(F, height, width, 3), depth.view(F, height, width)
