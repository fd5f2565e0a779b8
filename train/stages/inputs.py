"""From a training batch to WorldDiT inputs: latents, per-latent noise, conditioning and its dropout.

Shared by the pretrain and mid-train stages (and by later stages that fine-tune with flow
matching), so every stage feeds the network the way the rollout sampler does: the sequence is a
``models.layout.Layout`` (the sampler's own layout builder), gathered from the clip by
:func:`layout_inputs`: the slots' latents, actions, cameras (w2c + normalised K) and reframed
positions; the image slot pinned (clean, σ = 0, no loss: the sampler writes the image there
exactly); context σ tags; the loss on the new latents. Conditioning dropout uses the sampler's
definition of "unconditional" (models.rollout): no text tokens, action 0, identity cameras; the
image is always kept. The loss reads the network's output through ``models.flow`` (its prediction
parameterisation) in the stage's loss space.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

from models.flow import add_noise, prediction_loss, prediction_of
from models.layout import Layout


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


def clip_inputs(batch: dict[str, Any], x0: Tensor, chunk_size: Optional[int]) -> ModelInputs:
    """The whole clips of a batch as a source to gather layouts from (x0 [B, C, T, h, w]; image = latent 0)."""
    B, _, T = x0.shape[:3]
    dev = x0.device
    return ModelInputs(
        x0=x0,
        sigma=torch.zeros(B, T, device=dev),
        actions=batch["actions"].to(dev),
        w2c=batch["w2c"].to(dev).float(),
        K=batch["K"].to(dev).float(),
        t_pos=torch.arange(T, device=dev).expand(B, T).clone(),
        image_latent=x0[:, :, 0].clone(),
        cond_mask=None,
        loss_mask=torch.ones(B, T, device=dev),
        chunk_size=chunk_size,
    )


def layout_inputs(clip: ModelInputs, layouts: list[Layout], new_sigma: Tensor, context_sigma: Tensor | float) -> ModelInputs:
    """Gather one layout per clip (all of one length S) into model inputs.

    new_sigma [B, S] is used on each layout's new slots, context_sigma (scalar or [B, S]) on its context
    slots; the image slot is clean (σ 0) and carries no loss, as the sampler pins it.
    """
    if len(layouts) != clip.x0.shape[0] or len({lay.length for lay in layouts}) != 1:
        raise ValueError(f"layout_inputs: need one layout per clip ({clip.x0.shape[0]}) of one length, got "
                         f"{[lay.length for lay in layouts]}")
    dev = clip.x0.device
    layouts = [lay.to(dev) for lay in layouts]
    idx = torch.cat([lay.indices for lay in layouts])
    new = torch.cat([lay.new_mask for lay in layouts])
    image = torch.cat([lay.image_mask for lay in layouts])
    inp = clip.take(idx)
    inp.t_pos = torch.cat([lay.positions for lay in layouts])
    inp.cond_mask = image
    inp.loss_mask = (new & ~image).float()
    ctx = torch.as_tensor(context_sigma, dtype=torch.float32, device=dev).expand_as(new_sigma)
    inp.sigma = torch.where(image, torch.zeros((), device=dev), torch.where(new, new_sigma.to(dev), ctx))
    return inp


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


def flow_matching_loss(
    model: torch.nn.Module, inp: ModelInputs, eps: Tensor, loss_space: str = "v", sigma_floor: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Masked flow-matching MSE in ``loss_space`` (models.flow.prediction_loss): (scalar loss, per-latent loss [B, T]).

    The network's output is read through its own prediction parameterisation (``model.cfg.prediction``).
    """
    x_sigma = add_noise(inp.x0, eps, inp.sigma)
    out = model(x_sigma, inp.sigma, **model_kwargs(inp))
    err = prediction_loss(out, inp.x0, eps, inp.sigma, prediction_of(model), loss_space, sigma_floor)
    per_latent = err.mean(dim=(1, 3, 4))  # [B, T]
    mask = inp.loss_mask
    loss = (per_latent * mask).sum() / mask.sum().clamp_min(1.0)
    return loss, per_latent.detach()

