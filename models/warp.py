"""The conditioning image turned into each latent's camera (``model.image_warp``).

A small DiT with wide patch tokens learns slowly to move the first frame's content by the camera:
the motion between latents is a fraction of a token, and attention must synthesise the shifted
patch. Here the geometry does that part. The image latent is resampled by the rotation-only
homography x_img ~ K·Rᵀ·K⁻¹·x_t (R the rotation from the image's camera to latent t's), which is
exact for camera rotation and ignores parallax. The I2V conditioning channels then carry, for every
latent, the image as that latent's camera would see it. Rays behind the image's camera, and pixels
outside the image, read zero.

Cameras are relative to the image's: w2c is rebased to the first latent everywhere (training
windows and the sampler), so R_t = w2c_t[:3, :3]. Two layouts of the latent grid are supported:
``"patch"``, whose channels are (rgb, row, col) pixel patches (the patch autoencoder with one frame
per latent: resampled exactly, in pixels), and ``"latent"``, which resamples the latent grid itself
(video VAEs, whose latents are local features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from data.geometry import pixel_rays

__all__ = ["IMAGE_WARPS", "check_image_warp", "warp_into_cameras"]

IMAGE_WARPS = ("off", "patch", "latent")


def check_image_warp(mode: str, latent_channels: int) -> str:
    """``mode`` if usable with latents of ``latent_channels``, else ValueError naming ``model.image_warp``."""
    if mode not in IMAGE_WARPS:
        raise ValueError(f"model.image_warp: {mode!r} is not one of {IMAGE_WARPS}")
    if mode == "patch" and _patch_size(latent_channels) == 0:
        raise ValueError(f"model.image_warp='patch' needs latents of 3·p² channels (RGB pixel patches), "
                         f"got {latent_channels}")
    return mode


def _patch_size(channels: int) -> int:
    p = math.isqrt(channels // 3)
    return p if channels % 3 == 0 and 3 * p * p == channels else 0


def _source_grid(w2c: Tensor, K: Tensor, H: int, W: int) -> Tensor:
    """grid_sample coordinates [B*T, H, W, 2] in the image for every pixel of every latent's camera."""
    B, T = w2c.shape[:2]
    K = K.float()
    d_t = pixel_rays(K, H, W)  # [B, T, N, 3] rays in latent t's camera
    d_img = d_t @ w2c.float()[..., :3, :3]  # Rᵀ·d as row vectors: the same ray in the image's camera
    z = d_img[..., 2]
    ahead = z > 1e-4
    z = torch.where(ahead, z, torch.ones_like(z))
    u0 = d_img[..., 0] / z * K[..., 0, 0, None] + K[..., 0, 2, None]
    v0 = d_img[..., 1] / z * K[..., 1, 1, None] + K[..., 1, 2, None]
    grid = torch.stack([u0 * 2 - 1, v0 * 2 - 1], dim=-1)
    grid = torch.where(ahead[..., None], grid, torch.full_like(grid, 4.0))  # behind the camera: outside, zero
    return grid.reshape(B * T, H, W, 2)


def warp_into_cameras(image_latent: Tensor, w2c: Tensor, K: Tensor, mode: str) -> Tensor:
    """image_latent [B, C, h, w] as seen from each camera: [B, C, T, h, w].

    w2c [B, T, 4, 4] relative to the image's camera; K [B, T, 3, 3] normalised intrinsics (the image
    shares them: one camera model per clip). An identity camera returns the image itself.
    """
    B, C, h, w = image_latent.shape
    T = w2c.shape[1]
    src = image_latent.float()
    p = _patch_size(C) if mode == "patch" else 1
    if mode == "patch":  # channels (rgb, row, col) -> pixels [B, 3, h·p, w·p]
        src = src.reshape(B, 3, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, 3, h * p, w * p)
    elif mode != "latent":
        raise ValueError(f"warp_into_cameras: mode must be 'patch' or 'latent', got {mode!r}")
    c, H, W = src.shape[1:]
    grid = _source_grid(w2c, K, H, W)
    out = F.grid_sample(src[:, None].expand(B, T, c, H, W).reshape(B * T, c, H, W), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False).reshape(B, T, c, H, W)
    if mode == "patch":
        out = out.reshape(B, T, 3, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5).reshape(B, C, T, h, w)
    else:
        out = out.permute(0, 2, 1, 3, 4)
    return out.to(image_latent.dtype)
