"""Camera geometry: one implementation of poses and intrinsics for every stage.

Conventions (used everywhere in Worldsmith):
- Cameras follow OpenCV: x right, y down, z forward. A pose is a 4x4 camera-to-world matrix
  ``c2w``; its inverse ``w2c`` maps world points into the camera frame.
- Intrinsics ``K`` are in pixels in *continuous* image coordinates: the image spans [0, W] x [0, H]
  and the centre of pixel (i, j) is at (j + 0.5, i + 0.5). Under this convention resizing scales
  every entry of the first two rows, and cropping shifts the principal point.
- All functions take and return torch tensors with arbitrary leading batch dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "invert_rigid",
    "relative_pose",
    "rebase_to_first",
    "is_rigid",
    "rotation_x",
    "rotation_y",
    "euler_xyz_degrees",
    "make_pose",
    "resize_intrinsics",
    "crop_intrinsics",
    "normalize_intrinsics",
    "make_intrinsics",
    "project",
    "pixel_rays",
    "camera_center",
    "camera_forward",
]


def invert_rigid(T: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] using R^T (exact and cheaper than a general inverse)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def relative_pose(c2w_from: Tensor, c2w_to: Tensor) -> Tensor:
    """Pose of camera ``to`` expressed in the frame of camera ``from``: inv(from) @ to, [..., 4, 4]."""
    return invert_rigid(c2w_from) @ c2w_to


def rebase_to_first(c2w: Tensor) -> Tensor:
    """Re-express a trajectory [..., F, 4, 4] so that its first camera is the identity."""
    return invert_rigid(c2w[..., :1, :, :]) @ c2w


def is_rigid(T: Tensor, atol: float = 1e-3) -> Tensor:
    """Per-matrix check that T [..., 4, 4] is a proper rigid transform (R orthonormal, det +1, last row 0001)."""
    R = T[..., :3, :3].double()
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    orth = (R @ R.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2)) < atol
    det = (torch.linalg.det(R) - 1.0).abs() < atol
    bottom = T[..., 3, :].double()
    last = (bottom - torch.tensor([0, 0, 0, 1], dtype=bottom.dtype, device=bottom.device)).abs().amax(-1) < atol
    finite = torch.isfinite(T).all(dim=-1).all(dim=-1)
    return orth & det & last & finite


def rotation_x(deg: Tensor | float) -> Tensor:
    """Rotation about the camera x axis, [..., 3, 3]. Positive angles pitch the view *up* (y points down)."""
    a = torch.as_tensor(deg, dtype=torch.float64) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([o, z, z, z, c, -s, z, s, c], dim=-1).reshape(*a.shape, 3, 3)


def rotation_y(deg: Tensor | float) -> Tensor:
    """Rotation about the camera y axis, [..., 3, 3]. Positive angles yaw the view to the *right*."""
    a = torch.as_tensor(deg, dtype=torch.float64) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(*a.shape, 3, 3)


def euler_xyz_degrees(R: Tensor) -> Tensor:
    """Extrinsic x-y-z Euler angles (degrees) of R = Rz(c) Ry(b) Rx(a), returned as [..., 3] = (a, b, c).

    Matches scipy's ``Rotation.as_euler('xyz', degrees=True)``, which WorldPlay uses to derive keys.
    """
    a = torch.atan2(R[..., 2, 1], R[..., 2, 2])
    b = torch.asin((-R[..., 2, 0]).clamp(-1.0, 1.0))
    c = torch.atan2(R[..., 1, 0], R[..., 0, 0])
    return torch.stack([a, b, c], dim=-1) * (180.0 / math.pi)


def make_pose(R: Tensor, t: Tensor) -> Tensor:
    """Assemble [..., 4, 4] rigid transforms from R [..., 3, 3] and t [..., 3]."""
    T = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t.to(R.dtype)
    T[..., 3, 3] = 1.0
    return T


def make_intrinsics(fov_x_deg: float, width: int, height: int, fov_y_deg: float | None = None) -> Tensor:
    """Pinhole K [3, 3] in pixels for a centred principal point; square pixels unless fov_y is given."""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    fy = fx if fov_y_deg is None else 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor([[fx, 0.0, width / 2], [0.0, fy, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float32)


def resize_intrinsics(K: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """K [..., 3, 3] for an image resized from old (H, W) to new (H, W)."""
    sy = new_hw[0] / old_hw[0]
    sx = new_hw[1] / old_hw[1]
    out = K.clone()
    out[..., 0, :] = out[..., 0, :] * sx
    out[..., 1, :] = out[..., 1, :] * sy
    out[..., 2, :] = K[..., 2, :]
    return out


def crop_intrinsics(K: Tensor, top: int, left: int) -> Tensor:
    """K [..., 3, 3] for an image cropped so that pixel (top, left) becomes the origin."""
    out = K.clone()
    out[..., 0, 2] = out[..., 0, 2] - left
    out[..., 1, 2] = out[..., 1, 2] - top
    return out


def normalize_intrinsics(K: Tensor, width: int, height: int) -> Tensor:
    """Resolution-free intrinsics [..., 3, 3]: fx/W, fy/H, cx/W, cy/H (camera attention input)."""
    out = K.clone()
    out[..., 0, :] = out[..., 0, :] / width
    out[..., 1, :] = out[..., 1, :] / height
    out[..., 2, :] = K[..., 2, :]
    return out


def pixel_rays(K: Tensor, height: int, width: int) -> Tensor:
    """Camera-frame rays (x, y, 1) [..., height*width, 3] through the centres of a height×width grid, row-major,
    for normalised intrinsics K [..., 3, 3] (:func:`normalize_intrinsics`)."""
    K = K.float()
    v, u = torch.meshgrid((torch.arange(height, device=K.device) + 0.5) / height,
                          (torch.arange(width, device=K.device) + 0.5) / width, indexing="ij")
    x = (u.reshape(-1) - K[..., 0, 2, None]) / K[..., 0, 0, None]
    y = (v.reshape(-1) - K[..., 1, 2, None]) / K[..., 1, 1, None]
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def project(K: Tensor, w2c: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points [..., N, 3] to pixels [..., N, 2] and camera depths [..., N]."""
    homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    cam = (w2c @ homo.transpose(-1, -2)).transpose(-1, -2)[..., :3]
    depth = cam[..., 2]
    uvw = (K @ cam.transpose(-1, -2)).transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:3], depth


def camera_center(c2w: Tensor) -> Tensor:
    """Camera centres [..., 3] in world coordinates."""
    return c2w[..., :3, 3]


def camera_forward(c2w: Tensor) -> Tensor:
    """Unit viewing directions (camera +z) [..., 3] in world coordinates."""
    return c2w[..., :3, 2]
