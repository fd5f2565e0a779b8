"""Full-reference image metrics on batches of frames: PSNR and SSIM.

Frames come in either of the two layouts the project uses:
- float [B, 3, H, W] with values in [0, 1] (model outputs, decoded latents);
- uint8 [B, H, W, 3] (the clip contract's ``video``), converted by :func:`to_float_frames`.

Every function returns one value per frame, [B] float64, so callers can average over frames,
clips or time steps as their protocol needs. Definitions are in ``eval/README.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_float_frames", "psnr", "ssim", "gaussian_window", "SSIM_WINDOW", "SSIM_SIGMA", "SSIM_K1", "SSIM_K2"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# ITU-R BT.601 luma weights (the original SSIM code's rgb2gray).
_LUMA = (0.299, 0.587, 0.114)


def to_float_frames(x: Tensor, name: str = "frames") -> Tensor:
    """Frames as float [B, 3, H, W]: uint8 [B, H, W, 3] is scaled to [0, 1]; float [B, 3, H, W] passes through.

    Raises ValueError naming ``name`` and the shape for any other layout.
    """
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name}: uint8 frames must be [B, H, W, 3], got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{name}: frames must be uint8 [B, H, W, 3] or float [B, 3, H, W], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: float frames must be [B, 3, H, W], got shape {tuple(x.shape)}")
    return x


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Both inputs as float frames of one shape; also whether they came as uint8."""
    was_uint8 = torch.as_tensor(a).dtype == torch.uint8 or torch.as_tensor(b).dtype == torch.uint8
    fa, fb = to_float_frames(a, "a"), to_float_frames(b, "b")
    if fa.shape != fb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    dtype = torch.promote_types(fa.dtype, fb.dtype)
    return fa.to(dtype), fb.to(dtype), was_uint8


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per frame, [B] float64 in dB: 10 log10(data_range^2 / MSE).

    MSE is over all channels and pixels of a frame; identical frames give +inf. uint8 inputs are
    converted to [0, 1] first, so ``data_range`` must then stay 1.0.
    """
    fa, fb, was_uint8 = _pair(a, b)
    if was_uint8 and data_range != 1.0:
        raise ValueError(f"uint8 frames are converted to [0, 1]; data_range must be 1.0, got {data_range}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    mse = (fa.double() - fb.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 1-D Gaussian [size] centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype)


def _blur_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter of x [N, C, H, W] over the 'valid' region only (no padding)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(
    a: Tensor,
    b: Tensor,
    data_range: float = 1.0,
    channels: Literal["rgb", "luma"] = "rgb",
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """Structural similarity per frame, [B] float64 (Wang et al. 2004, Gaussian-weighted).

    Local statistics use an ``window``-tap Gaussian (sigma 1.5) over the valid region (no padding);
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = ``data_range``. ``channels="rgb"`` computes SSIM on
    each channel and averages the maps (torchmetrics / scikit-image ``channel_axis`` convention);
    ``"luma"`` computes it once on BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B (the original code).
    Frames smaller than the window raise ValueError.
    """
    fa, fb, was_uint8 = _pair(a, b)
    if was_uint8 and data_range != 1.0:
        raise ValueError(f"uint8 frames are converted to [0, 1]; data_range must be 1.0, got {data_range}")
    if fa.shape[-2] < window or fa.shape[-1] < window:
        raise ValueError(f"ssim needs frames of at least {window}x{window} pixels, got {tuple(fa.shape[-2:])}")
    if channels == "luma":
        w = torch.tensor(_LUMA, dtype=fa.dtype, device=fa.device).view(1, 3, 1, 1)
        fa, fb = (fa * w).sum(1, keepdim=True), (fb * w).sum(1, keepdim=True)
    elif channels != "rgb":
        raise ValueError(f"channels must be 'rgb' or 'luma', got {channels!r}")
    # float64 on CPU for exact reference values; float32 elsewhere (float64 is slow on GPUs).
    work = torch.float64 if fa.device.type == "cpu" else torch.float32
    fa, fb = fa.to(work), fb.to(work)
    g = gaussian_window(window, sigma, work).to(fa.device)
    n = fa.shape[0]
    # One grouped convolution for the five local moments of every frame.
    stats = _blur_valid(torch.cat([fa, fb, fa * fa, fb * fb, fa * fb], dim=0), g)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.split(n, dim=0)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(dim=1).double()

