"""From a training batch to WorldDiT inputs: latents, per-latent noise, conditioning and its dropout.

Shared by the pretrain and mid-train stages (and by later stages that fine-tune with flow
matching), so every stage feeds the network the same way the rollout sampler does: image-to-video
conditioning on latent 0, per-latent sigma, actions, cameras (w2c + normalised K), explicit
temporal positions. Conditioning dropout uses the sampler's definition of "unconditional"
(models.rollout): no text tokens, action 0, identity cameras; the image is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

from models.flow import add_noise, velocity_target


@dataclass
class ModelInputs:
    """Everything one WorldDiT forward needs, batch-first; shapes in the comments."""

    x0: Tensor  # [B, C, T, h, w] clean latents
    sigma: Tensor  # [B, T] per-latent noise level
    actions: Tensor  # [B, T] int64
    w2c: Tensor  # [B, T, 4, 4]
    K: Tensor  # [B, T, 3, 3] normalised intrinsics
    t_pos: Tensor  # [B, T] int64 temporal positions
    image_latent: Optional[Tensor]  # [B, C, h, w]
    cond_mask: Optional[Tensor]  # [B, T] bool
    loss_mask: Tensor  # [B, T] float: which latents the loss counts
    text: Optional[Tensor] = None  # [B, L, D]
    text_mask: Optional[Tensor] = None  # [B, L] bool
    chunk_size: Optional[int] = None  # None: bidirectional; C: block-causal

    def to(self, device: torch.device) -> "ModelInputs":
        moved = {f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor) else getattr(self, f.name)) for f in fields(self)}
        return ModelInputs(**moved)

    def take(self, idx: Tensor) -> "ModelInputs":
        """Select latents ``idx`` [B, T'] (per batch element) along time; text and image unchanged."""
        b = torch.arange(idx.shape[0], device=idx.device)[:, None]

        def pick(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[b, idx]

        x0 = self.x0.permute(0, 2, 1, 3, 4)[b, idx].permute(0, 2, 1, 3, 4)
        return replace(self, x0=x0, sigma=pick(self.sigma), actions=pick(self.actions), w2c=pick(self.w2c), K=pick(self.K), t_pos=pick(self.t_pos), cond_mask=pick(self.cond_mask), loss_mask=pick(self.loss_mask))


@torch.no_grad()
def encode_video(autoencoder: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> Tensor:
    """Latents [B, C, T, h, w] of a batch: precomputed ``latents`` when present, else encoded now."""
    if "latents" in batch:
        return batch["latents"].to(device, non_blocking=True).float()
    video = batch["video"].to(device, non_blocking=True)
    return autoencoder.encode(video).float()


def batch_inputs(batch: dict[str, Any], x0: Tensor, chunk_size: Optional[int]) -> ModelInputs:
    """Inputs for a window batch: contiguous positions, the image on latent 0, loss on every latent."""
    B, _, T = x0.shape[:3]
    dev = x0.device
    cond = torch.zeros(B, T, dtype=torch.bool, device=dev)
    cond[:, 0] = True
    return ModelInputs(
        x0=x0,
        sigma=torch.zeros(B, T, device=dev),
        actions=batch["actions"].to(dev),
        w2c=batch["w2c"].to(dev).float(),
        K=batch["K"].to(dev).float(),
        t_pos=torch.arange(T, device=dev).expand(B, T).clone(),
        image_latent=x0[:, :, 0].clone(),
        cond_mask=cond,
        loss_mask=torch.ones(B, T, device=dev),
        chunk_size=chunk_size,
    )


def drop_conditioning(inp: ModelInputs, *, text_p: float, action_p: float, camera_p: float, generator: torch.Generator) -> ModelInputs:
    """Per sample, replace text / actions / cameras by the sampler's unconditional values (for CFG)."""
    B = inp.x0.shape[0]
    dev = inp.x0.device

    def coin(p: float) -> Tensor:
        return (torch.rand(B, generator=generator, device=generator.device) < p).to(dev)

    out = replace(inp)
    if action_p > 0:
        drop = coin(action_p)
        out.actions = torch.where(drop[:, None], torch.zeros_like(inp.actions), inp.actions)
    if camera_p > 0:
        drop = coin(camera_p)
        eye = torch.eye(4, device=dev, dtype=inp.w2c.dtype).expand_as(inp.w2c)
        out.w2c = torch.where(drop[:, None, None, None], eye, inp.w2c)
    if text_p > 0 and inp.text is not None and inp.text_mask is not None:
        drop = coin(text_p)
        out.text_mask = inp.text_mask & ~drop[:, None]
    return out


def noised(inp: ModelInputs, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_sigma, target velocity) for the flow-matching loss."""
    return add_noise(inp.x0, eps, inp.sigma), velocity_target(inp.x0, eps)


def model_kwargs(inp: ModelInputs) -> dict[str, Any]:
    """Keyword arguments of WorldDiT.forward (besides x and sigma)."""
    return {
        "actions": inp.actions,
        "w2c": inp.w2c,
        "K": inp.K,
        "t_pos": inp.t_pos,
        "text": inp.text,
        "text_mask": inp.text_mask,
        "image_latent": inp.image_latent,
        "cond_mask": inp.cond_mask,
        "chunk_size": inp.chunk_size,
    }


def flow_matching_loss(model: torch.nn.Module, inp: ModelInputs, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Masked MSE between the predicted and true velocity: (scalar loss, per-latent loss [B, T])."""
    x_sigma, target = noised(inp, eps)
    pred = model(x_sigma, inp.sigma, **model_kwargs(inp))
    per_latent = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, T]
    mask = inp.loss_mask
    loss = (per_latent * mask).sum() / mask.sum().clamp_min(1.0)
    return loss, per_latent.detach()
