"""The DiffusionNFT update (research/rl_distill.md §2.4), as WorldCompass meant to use it (§1.5).

Policy improvement on the forward process: a sampled clean candidate x0 with optimality r ∈ [0, 1] is
noised to x_σ = (1 − σ)·x0 + σ·ε, and the current policy's prediction v_θ is mixed with the sampling
policy's v_old into an implicit positive and negative policy

    v⁺ = β·v_θ + (1 − β)·sg(v_old),        v⁻ = (1 + β)·sg(v_old) − β·v_θ,

each read as a clean sample x̂0^± = x_σ − σ·v^±, and trained with adaptively weighted regressions

    L = mean_b [ r_b·‖x̂0⁺ − x0‖² / w⁺_b + (1 − r_b)·‖x̂0⁻ − x0‖² / w⁻_b ] / β,   w^± = sg(mean|x̂0^± − x0|).

x̂0 is affine in v with weights summing to one in both branches, so mixing velocities is mixing clean
predictions: x̂0⁺ = β·x̂0_θ + (1 − β)·sg(x̂0_old). The functions here therefore take clean predictions,
which every parameterisation yields exactly (``models.flow.output_to_x0``; no division by σ), so the
update is the same whether the network predicts v or x0.

Properties (tests/test_rl.py): with r ≡ 1 and β = 1 the loss is the adaptively weighted flow-matching
loss L⁺ (value and gradient, whatever v_old); on-policy (v_old = sg(v_θ)) its gradient is ∇L⁺ at any β; with v_old = sg(v_θ) and β = 1 — the released WorldCompass code, which
overwrites v_old with the current model's prediction (``official_overwrite``) — the gradient is
(2r − 1)·∇L⁺: advantage-signed regression onto the policy's own samples, with no trust region.
Dividing by β keeps the gradient at v_old = v_θ independent of β.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["masked_mean", "adaptive_flow_matching", "nft_loss", "kl_penalty"]


def masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Per-sample mean [B] of x [B, ...] over the entries where ``mask`` (broadcastable to x, 0/1) is set."""
    x = x.float()
    if mask is None:
        return x.flatten(1).mean(dim=1)
    m = mask.to(device=x.device, dtype=x.dtype).expand_as(x)
    return (x * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1.0)


def _weighted_sq_error(pred: Tensor, x0: Tensor, mask: Optional[Tensor], adaptive: bool, floor: float) -> tuple[Tensor, Tensor]:
    """(‖pred − x0‖² / sg(mean |pred − x0|) per sample [B], the weight [B]); weight 1 when not ``adaptive``."""
    err = pred.float() - x0.float()
    sq = masked_mean(err.square(), mask)
    if not adaptive:
        return sq, torch.ones_like(sq)
    w = masked_mean(err.detach().abs(), mask).clamp_min(floor)
    return sq / w, w


def adaptive_flow_matching(x0_pred: Tensor, x0: Tensor, mask: Optional[Tensor] = None, floor: float = 1e-5) -> Tensor:
    """The adaptively weighted flow-matching loss L⁺ (scalar): mean_b ‖x̂0 − x0‖²_b / sg(mean |x̂0 − x0|_b).

    x0_pred, x0: [B, ...]; mask broadcastable to them (e.g. [B, 1, L, 1, 1] for latents [B, C, L, h, w]).
    """
    return _weighted_sq_error(x0_pred, x0, mask, True, floor)[0].mean()


def nft_loss(
    x0_theta: Tensor,
    x0_old: Optional[Tensor],
    x0: Tensor,
    r: Tensor,
    *,
    beta: float = 1.0,
    mask: Optional[Tensor] = None,
    adaptive: bool = True,
    floor: float = 1e-5,
    official_overwrite: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The NFT policy loss (scalar) and its parts, for a batch of B samples.

    x0_theta [B, ...]: the current policy's clean prediction at (x_σ, σ), with its graph. x0_old [B, ...]:
    the sampling policy's, at the same input (detached here); ignored with ``official_overwrite``, which
    uses sg(x0_theta) instead (the released code). x0 [B, ...]: the sampled candidates. r [B]: optimality
    in [0, 1]. mask: which entries count (broadcastable; e.g. not the pinned image latent).
    Returns (loss, {"loss_pos", "loss_neg", "w_pos", "w_neg", "r"}: per-batch means, detached).
    """
    if beta <= 0:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    if official_overwrite:
        x0_old = x0_theta.detach()
    if x0_old is None:
        raise ValueError("nft_loss: x0_old (the sampling policy's prediction) is required unless official_overwrite")
    if x0_theta.shape != x0.shape or x0_old.shape != x0.shape:
        raise ValueError(f"nft_loss: x0_theta {tuple(x0_theta.shape)}, x0_old {tuple(x0_old.shape)} and x0 {tuple(x0.shape)} must match")
    r = torch.as_tensor(r, dtype=torch.float32, device=x0.device).reshape(-1)
    if r.shape[0] != x0.shape[0]:
        raise ValueError(f"nft_loss: r has {r.shape[0]} entries for a batch of {x0.shape[0]}")
    theta, old = x0_theta.float(), x0_old.detach().float()
    pos = beta * theta + (1.0 - beta) * old
    neg = (1.0 + beta) * old - beta * theta
    l_pos, w_pos = _weighted_sq_error(pos, x0, mask, adaptive, floor)
    l_neg, w_neg = _weighted_sq_error(neg, x0, mask, adaptive, floor)
    loss = (r * l_pos + (1.0 - r) * l_neg).mean() / beta
    parts = {"loss_pos": l_pos.detach().mean(), "loss_neg": l_neg.detach().mean(), "w_pos": w_pos.mean(), "w_neg": w_neg.mean(), "r": r.mean()}
    return loss, parts


def kl_penalty(v_theta: Tensor, v_ref: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """DiffusionNFT's KL surrogate (scalar): mean_b mean ‖v_θ − sg(v_ref)‖² over the masked entries."""
    return masked_mean((v_theta.float() - v_ref.detach().float()).square(), mask).mean()
