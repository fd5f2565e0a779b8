"""Distribution-matching math: the DMD noise level, the DMD2-normalised generator loss. Pure tensor functions.

Conventions (models/flow.py): x_σ = (1 − σ)·x0 + σ·ε; scores are read as clean-sample predictions x̂0
(a network's raw output goes through ``models.flow.output_to_x0``, whatever its parameterisation).

DMD (research/rl_distill.md §3.1): for a generated sample x, a shared noise level σ and x_σ from x,

    g = (x̂0_fake(x_σ) − x̂0_real(x_σ)) / mean|x − x̂0_real(x_σ)|        (per sample, DMD2's normalisation)
    L = ½ · mean (x − sg(x − g))²                                        so  ∂L/∂x = g / n

Descending L moves x towards the real score's prediction and away from the fake score's: the reverse-KL
gradient KL(p_student ‖ p_data) approximated by the difference of the two scores. The pinned image
latent (and anything else outside ``mask``) carries no loss and does not enter the normaliser.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from models.flow import shift_sigma

__all__ = ["dmd_sigma", "dmd_loss", "masked_mean"]


def dmd_sigma(batch: int, generator: Optional[torch.Generator], shift: float, lo: float, hi: float,
              device: torch.device | str | None = None) -> Tensor:
    """One noise level per sample [batch]: shift(u), u ~ U[0, 1), clamped to [lo, hi] (Self-Forcing: shift 5, [.02, .98])."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=gen_device)
    return shift_sigma(u, shift).clamp(lo, hi).to(device if device is not None else gen_device)


def _mask5(mask: Tensor, x: Tensor) -> Tensor:
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"mask must be [B, T] = {[x.shape[0], x.shape[2]]} for latents {list(x.shape)}, got {list(mask.shape)}")
    return mask.to(device=x.device, dtype=x.dtype)[:, None, :, None, None].expand_as(x)


def masked_mean(err: Tensor, mask: Tensor) -> Tensor:
    """Mean of err [B, C, T, h, w] over the latents where mask [B, T] is set (scalar)."""
    m = _mask5(mask, err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, mask: Tensor, eps: float = 1e-6) -> tuple[Tensor, dict[str, Tensor]]:
    """The DMD generator loss of samples x [B, C, T, h, w] (carrying the generator's graph).

    x0_real / x0_fake: the scores' clean predictions at the same x_σ (no graph); mask [B, T] bool: latents
    that count (not the pinned image). Returns (loss, detached stats: normaliser, |g|, real-fake gap).
    """
    m = _mask5(mask, x)
    with torch.no_grad():
        xd = x.detach().float()
        real, fake = x0_real.detach().float(), x0_fake.detach().float()
        mf = m.float()
        count = mf.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)  # per sample
        norm = ((xd - real).abs() * mf).sum(dim=(1, 2, 3, 4)) / count  # mean |x - x0_real| per sample
        g = torch.nan_to_num((fake - real) / norm.clamp_min(eps).view(-1, 1, 1, 1, 1)) * mf
        target = (xd - g).to(x.dtype)
    loss = 0.5 * (((x - target) ** 2) * m).sum() / m.sum().clamp_min(1.0)
    stats = {
        "normaliser": norm.mean(),
        "grad_abs": (g.abs().sum() / mf.sum().clamp_min(1.0)),
        "real_fake_gap": ((fake - real).abs() * mf).sum() / mf.sum().clamp_min(1.0),
    }
    return loss, stats
