"""Flow-matching math: noising, velocity target, sigma schedules, Euler steps. Pure tensor functions.

Convention (HunyuanVideo / WorldPlay code, research/worldplay.md §2.3):
``x_σ = (1 − σ)·x0 + σ·ε``, the network predicts ``v = ε − x0``, and an Euler step is
``x ← x + (σ_next − σ)·v`` going from σ = 1 (noise) to σ = 0 (data); timestep ``t = 1000·σ``.
``sigma`` arguments broadcast per sample ([B]) or per latent frame ([B, T]) over latents
[B, C, T, H, W], so each latent frame can carry its own noise level (diffusion forcing).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

# The 4-step distilled schedule: Self-Forcing's t = [1000, 750, 500, 250] warped with shift 5.
DISTILLED_SIGMAS = (1.0, 0.9375, 0.8333, 0.625)
SCHEDULES = ("euler", "distilled")


def _expand_sigma(sigma: Union[Tensor, float], x: Tensor) -> Union[Tensor, float]:
    """σ shaped to broadcast over latents ``x`` [B, C, T, ...]: scalar, [B] or [B, T]."""
    if not isinstance(sigma, Tensor) or sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1 and sigma.shape[0] == x.shape[0]:
        return sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    if sigma.ndim == 2 and x.ndim >= 3 and sigma.shape == (x.shape[0], x.shape[2]):
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], *([1] * (x.ndim - 3))).to(x.dtype)
    raise ValueError(
        f"sigma of shape {list(sigma.shape)} does not broadcast over latents {list(x.shape)}: "
        f"expected a scalar, [B] or [B, T] with B={x.shape[0]}" + (f", T={x.shape[2]}" if x.ndim >= 3 else "")
    )


def add_noise(x0: Tensor, eps: Tensor, sigma: Union[Tensor, float]) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε for latents [B, C, T, H, W] and σ scalar, [B] or [B, T]."""
    s = _expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The network's regression target v = ε − x0."""
    return eps - x0


def x0_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Union[Tensor, float]) -> Tensor:
    """Clean sample implied by a velocity: x0 = x_σ − σ·v."""
    return x_sigma - _expand_sigma(sigma, x_sigma) * v


def eps_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Union[Tensor, float]) -> Tensor:
    """Noise implied by a velocity: ε = x_σ + (1 − σ)·v."""
    return x_sigma + (1 - _expand_sigma(sigma, x_sigma)) * v


def shift_sigma(sigma: Union[Tensor, float], shift: float) -> Union[Tensor, float]:
    """Timestep shift s·σ / (1 + (s − 1)·σ): s > 1 spends more steps at high noise; fixes 0 and 1."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def inference_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """σ schedule [num_steps + 1]: linspace(1, 0) shifted, from 1 down to exactly 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def distilled_sigmas() -> Tensor:
    """The 4-step distilled schedule [5]: DISTILLED_SIGMAS followed by 0."""
    return torch.tensor((*DISTILLED_SIGMAS, 0.0), dtype=torch.float32)


def sampling_sigmas(schedule: str, steps: int, shift: float) -> Tensor:
    """σ schedule [n + 1] ("euler": ``steps`` shifted steps; "distilled": the 4-step schedule)."""
    if schedule == "euler":
        return inference_sigmas(steps, shift)
    if schedule == "distilled":
        return distilled_sigmas()
    raise ValueError(f"sampling.schedule: unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def sample_train_sigma(
    shape: Union[int, tuple[int, ...]],
    generator: Optional[torch.Generator] = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """Training σ of ``shape``: shift(sigmoid(n)), n ~ N(logit_mean, logit_std²); median shift(sigmoid(mean))."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = torch.randn(shape, generator=generator, device=device) * logit_std + logit_mean
    return shift_sigma(torch.sigmoid(n), shift)


def chunk_sigmas(
    batch: int,
    num_latents: int,
    chunk_size: int,
    generator: Optional[torch.Generator] = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """Diffusion-forcing σ [batch, num_latents]: one logit-normal σ per chunk of ``chunk_size`` latents.

    The last chunk may be shorter when ``num_latents`` is not a multiple of ``chunk_size``.
    """
    if chunk_size < 1 or num_latents < 1:
        raise ValueError(f"chunk_size and num_latents must be >= 1, got {chunk_size}, {num_latents}")
    num_chunks = -(-num_latents // chunk_size)
    per_chunk = sample_train_sigma((batch, num_chunks), generator, logit_mean, logit_std, shift, device)
    return per_chunk.repeat_interleave(chunk_size, dim=1)[:, :num_latents]


def euler_step(x: Tensor, v: Tensor, sigma: Union[Tensor, float], sigma_next: Union[Tensor, float]) -> Tensor:
    """One Euler step of the flow ODE: x + (σ_next − σ)·v (σ scalar, [B] or [B, T])."""
    return x + (_expand_sigma(sigma_next, x) - _expand_sigma(sigma, x)) * v


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance v_uncond + scale·(v_cond − v_uncond), written so scale 1 returns v_cond exactly."""
    return v_cond + (scale - 1) * (v_cond - v_uncond)
