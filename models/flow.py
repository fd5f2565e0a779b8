"""Flow-matching math: noising, the prediction parameterisation, σ schedules, Euler steps. Pure tensor functions.

Convention (HunyuanVideo / WorldPlay code, research/worldplay.md §2.3):
``x_σ = (1 − σ)·x0 + σ·ε``, the velocity is ``v = ε − x0``, and an Euler step is
``x ← x + (σ_next − σ)·v`` going from σ = 1 (noise) to σ = 0 (data); timestep ``t = 1000·σ``.
``sigma`` arguments broadcast per sample ([B]) or per latent frame ([B, T]) over latents
[B, C, T, H, W], so each latent frame can carry its own noise level (diffusion forcing).

**Prediction parameterisation** (one idea, in one place): what the network's output *means*.
``prediction="v"`` reads it as the velocity (HunyuanVideo / WorldPlay); ``prediction="x0"`` reads it as
the clean sample (the "Back to Basics" x-prediction that pixel-space DiTs with wide patch tokens need:
a v-network must carry every token channel's noise through its hidden width, an x0-network only the
signal). Every consumer (the flow-matching loss, the rollout sampler, RL, distillation) converts a raw
output with :func:`output_to_velocity` / :func:`output_to_x0` and builds targets with
:func:`output_from_x0`, so the parameterisation is one config switch (``model.prediction``). The loss
space (``v``: regress velocities; ``x0``: regress clean samples) is separate: :func:`prediction_loss`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

# The 4-step distilled schedule: Self-Forcing's t = [1000, 750, 500, 250] warped with shift 5.
DISTILLED_SIGMAS = (1.0, 0.9375, 0.8333, 0.625)
SCHEDULES = ("euler", "distilled")
PREDICTIONS = ("v", "x0")  # what the network output means
LOSS_SPACES = ("v", "x0")  # which quantity the training loss regresses
# An x0 output read as a velocity divides by σ. The sampler never evaluates σ = 0 (its last call is at
# the smallest non-zero σ), pinned latents (σ = 0) are overwritten by the caller; this floor only keeps
# such entries finite. The training loss in v space uses its own, larger floor (``sigma_floor``).
_MIN_SIGMA = 1e-4


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


def check_prediction(prediction: str, where: str = "model.prediction") -> str:
    """``prediction`` if it is one of PREDICTIONS, else ValueError naming ``where``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"{where}: unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def prediction_of(model: "torch.nn.Module") -> str:
    """The prediction parameterisation of a model, or of the WorldDiT a wrapper holds (DDP, FSDP, LoRA, a spy).

    Looks for a ``cfg.prediction`` on the module and then on its submodules (wrapper first); raises
    ValueError if there is none, rather than guessing.
    """
    for m in model.modules():
        cfg = getattr(m, "cfg", None)
        if cfg is not None and hasattr(cfg, "prediction"):
            return check_prediction(cfg.prediction)
    raise ValueError(f"cannot tell whether {type(model).__name__} predicts v or x0: no module has cfg.prediction")


def output_to_x0(out: Tensor, x_sigma: Tensor, sigma: Union[Tensor, float], prediction: str) -> Tensor:
    """Clean sample x̂0 implied by a raw network output at (x_σ, σ): the output itself (x0) or x_σ − σ·out (v)."""
    if check_prediction(prediction) == "x0":
        return out
    return x0_from_velocity(x_sigma, out, sigma)


def output_to_velocity(
    out: Tensor, x_sigma: Tensor, sigma: Union[Tensor, float], prediction: str, sigma_floor: float = _MIN_SIGMA
) -> Tensor:
    """Velocity v̂ implied by a raw output: the output itself (v) or (x_σ − x̂0) / max(σ, sigma_floor) (x0).

    For σ >= sigma_floor the x0 reading is exact: an Euler step with this v̂ to σ' = 0 lands on x̂0.
    """
    if check_prediction(prediction) == "v":
        return out
    s = _expand_sigma(sigma, x_sigma)
    s = s.clamp_min(sigma_floor) if isinstance(s, Tensor) else max(float(s), sigma_floor)
    return (x_sigma - out) / s


def output_from_x0(x0: Tensor, x_sigma: Tensor, sigma: Union[Tensor, float], prediction: str) -> Tensor:
    """The raw output that means clean sample ``x0`` at (x_σ, σ): the inverse of :func:`output_to_x0` (σ > 0 for v)."""
    if check_prediction(prediction) == "x0":
        return x0
    s = _expand_sigma(sigma, x_sigma)
    return (x_sigma - x0) / s


def skip_x0(out: Tensor, x_sigma: Tensor, sigma: Union[Tensor, float], sigma_data: float) -> Tensor:
    """x̂0 = c_skip·x_σ + c_out·out: EDM's preconditioning (Karras et al. 2022) on the path x_σ = (1 − σ)·x0 + σ·ε.

    With a = 1 − σ and data std σ_d: c_skip = a·σ_d² / (a²σ_d² + σ²) (the best linear guess of x0 from x_σ),
    c_out = σ·σ_d / √(a²σ_d² + σ²) (the std of what is left), so the network's part has unit variance at every
    σ and a clean input (σ = 0) passes through exactly. Latents [B, C, T, H, W]; σ scalar, [B] or [B, T].
    """
    s = _expand_sigma(sigma, x_sigma)
    a, d2 = 1 - s, sigma_data ** 2
    var = a * a * d2 + s * s
    return (a * d2 / var) * x_sigma + (s * sigma_data / var ** 0.5) * out


def output_from_velocity(v: Tensor, x_sigma: Tensor, sigma: Union[Tensor, float], prediction: str) -> Tensor:
    """The raw output that means velocity ``v`` at (x_σ, σ): the inverse of :func:`output_to_velocity`."""
    if check_prediction(prediction) == "v":
        return v
    return x0_from_velocity(x_sigma, v, sigma)


def prediction_loss(
    out: Tensor, x0: Tensor, eps: Tensor, sigma: Union[Tensor, float], prediction: str, loss_space: str,
    sigma_floor: float = 0.05,
) -> Tensor:
    """Elementwise squared error of a raw output against the truth, in ``loss_space`` (same shape as x0).

    ``v``: (v̂ − (ε − x0))², with an x0 output read through (x_σ − x̂0) / max(σ, sigma_floor) (so the
    error is (x̂0 − x0)² / max(σ, floor)²: the "Back to Basics" v-loss on x-prediction). ``x0``:
    (x̂0 − x0)², with a v output read through x_σ − σ·v̂ (a weighting of the v-loss by σ²).
    """
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"loss space {loss_space!r} is not one of {LOSS_SPACES}")
    x_sigma = add_noise(x0, eps, sigma)
    if loss_space == "v":
        pred = output_to_velocity(out.float(), x_sigma.float(), sigma, prediction, sigma_floor)
        return (pred - velocity_target(x0, eps).float()).pow(2)
    return (output_to_x0(out.float(), x_sigma.float(), sigma, prediction) - x0.float()).pow(2)


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
