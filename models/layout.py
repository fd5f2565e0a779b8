"""The sequence layout: the one contract between training and sampling.

Every WorldDiT call over a video, in a training step or in the rollout sampler, sees a sequence of
latent *slots* described by a :class:`Layout`:

- ``indices`` [B, S]: which latent of the video sits in each slot; the first ``num_context`` slots are
  context (past latents, sorted), the rest are the latents being generated / trained;
- ``positions`` [B, S]: their temporal RoPE positions, contiguous (context 0..M-1, new M..S-1:
  WorldPlay's temporal reframing, so RoPE never sees a position beyond what training covered);
- the **image slot**: the slot that holds video latent 0, which *is* the conditioning image. It is
  pinned: its input is the image latent itself at σ = 0 and its output is replaced by the image
  latent, in training and in sampling alike (:func:`image_slots`, :func:`pin_image`);
- the loss mask: new latents that are not the image slot;
- σ tags: context slots carry the sampler's context tag (clean), the image slot 0, new latents the
  denoising σ (:meth:`Layout.sigmas`).

Builders: :func:`window_layout` (a contiguous window from latent ``start``; no context: pretraining,
and a sampler whose history is short enough to be used whole), :func:`chunk_layout` (an AR chunk
after a history, its context chosen by ``models.memory.select_context``; mid-training and the AR
sampler) and :func:`teacher_layout` (a bidirectional window with the union memory of its chunks: the
Context-Forcing teacher). The mid-train stage, the rollout sampler, RL and distillation all build
their sequences here, so a mismatch between training and inference cannot be written twice.

:func:`position_span` says how many temporal positions a sampler configuration reaches;
:func:`check_trained_span` refuses (or clamps) a sampling config that reaches beyond what training covered.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from models.memory import MemoryConfig, select_context, select_window_context

__all__ = [
    "IMAGE_LATENT",
    "Layout",
    "image_slots",
    "pin_image",
    "window_layout",
    "chunk_layout",
    "teacher_layout",
    "aligned_layout",
    "position_span",
    "check_trained_span",
    "clamp_memory",
    "sliding_window",
]

IMAGE_LATENT = 0  # the video latent that holds the conditioning image (image-to-video)


def image_slots(indices: Tensor) -> Tensor:
    """Bool [..., S]: the slots holding the conditioning image (video latent 0). The one definition."""
    return indices == IMAGE_LATENT


def pin_image(x: Tensor, mask: Tensor, image_latent: Optional[Tensor]) -> Tensor:
    """x [B, C, S, h, w] with the image slots (mask [B, S]) replaced by image_latent [B, C, h, w], exactly."""
    if image_latent is None:
        return x
    m = mask.to(x.device)[:, None, :, None, None]
    return torch.where(m, image_latent.to(x.dtype)[:, :, None], x)


@dataclass
class Layout:
    """Slots of one model call (see the module docstring). indices / positions: int64 [B, S]."""

    indices: Tensor
    positions: Tensor
    num_context: int

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def length(self) -> int:
        return self.indices.shape[1]

    @property
    def num_new(self) -> int:
        return self.length - self.num_context

    @property
    def context_idx(self) -> Tensor:
        return self.indices[:, : self.num_context]

    @property
    def context_pos(self) -> Tensor:
        return self.positions[:, : self.num_context]

    @property
    def new_idx(self) -> Tensor:
        return self.indices[:, self.num_context :]

    @property
    def new_pos(self) -> Tensor:
        return self.positions[:, self.num_context :]

    @property
    def image_mask(self) -> Tensor:
        """Bool [B, S]: the image slot (if video latent 0 is in the sequence)."""
        return image_slots(self.indices)

    @property
    def new_mask(self) -> Tensor:
        """Bool [B, S]: the slots being generated (after the context)."""
        return (torch.arange(self.length, device=self.indices.device) >= self.num_context).expand(self.batch, -1)

    @property
    def loss_mask(self) -> Tensor:
        """Float [B, S]: new latents that are not the pinned image: where a training loss counts."""
        return (self.new_mask & ~self.image_mask).float()

    def sigmas(self, new_sigma: Tensor, context_sigma: Tensor | float) -> Tensor:
        """σ per slot [B, S]: ``context_sigma`` (scalar or [B, S]) on context, ``new_sigma`` ([B, S] or
        scalar) on new latents, 0 on the image slot (the image is clean in every layout)."""
        dev = self.indices.device
        new = torch.as_tensor(new_sigma, dtype=torch.float32, device=dev).expand(self.batch, self.length)
        ctx = torch.as_tensor(context_sigma, dtype=torch.float32, device=dev).expand(self.batch, self.length)
        s = torch.where(self.new_mask, new, ctx)
        return torch.where(self.image_mask, torch.zeros((), device=dev), s)

    def to(self, device: torch.device | str) -> "Layout":
        return replace(self, indices=self.indices.to(device), positions=self.positions.to(device))


def _contiguous_positions(batch: int, num_context: int, num_new: int, device: torch.device) -> Tensor:
    return torch.arange(num_context + num_new, device=device).expand(batch, -1)


def window_layout(batch: int, start: int, length: int, device: torch.device | str | None = None) -> Layout:
    """Latents start..start+length-1 at positions 0..length-1, no context (a pretraining window)."""
    if start < 0 or length < 1:
        raise ValueError(f"window_layout: need start >= 0 and length >= 1, got start={start}, length={length}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    idx = torch.arange(start, start + length, device=dev).expand(batch, -1)
    return Layout(idx, _contiguous_positions(batch, 0, length, dev), 0)


def chunk_layout(c2w_past: Tensor, c2w_new: Tensor, memory: MemoryConfig) -> Layout:
    """AR layout for the latents N..N+L-1 after a history of N latents: [context | new], reframed.

    c2w_past [B, N, 4, 4], c2w_new [B, L, 4, 4]. The context is ``select_context`` (the whole
    history when N <= max_context, else recent + anchor + retrieved chunks); positions are 0..M+L-1.
    """
    if c2w_past.ndim != 4 or c2w_new.ndim != 4:
        raise ValueError(f"chunk_layout takes batched poses [B, N, 4, 4] and [B, L, 4, 4], got "
                         f"{tuple(c2w_past.shape)} and {tuple(c2w_new.shape)}")
    B, N, L, dev = c2w_past.shape[0], c2w_past.shape[1], c2w_new.shape[1], c2w_past.device
    ctx = select_context(c2w_past, c2w_new, memory)  # [B, M]
    new = torch.arange(N, N + L, device=dev).expand(B, L)
    M = ctx.shape[-1]
    return Layout(torch.cat([ctx, new], dim=1), _contiguous_positions(B, M, L, dev), M)


def teacher_layout(c2w_past: Tensor, c2w_window: Tensor, memory: MemoryConfig) -> Layout:
    """Bidirectional window layout (Context-Forcing teacher): the union memory of the window's chunks, then the window.

    c2w_past [N, 4, 4], c2w_window [W, 4, 4] (unbatched: the union's size depends on the poses).
    """
    N, W, dev = c2w_past.shape[0], c2w_window.shape[0], c2w_past.device
    ctx = select_window_context(c2w_past, c2w_window, memory)  # [M]
    idx = torch.cat([ctx, torch.arange(N, N + W, device=dev)])[None]
    M = ctx.shape[0]
    return Layout(idx, _contiguous_positions(1, M, W, dev), M)


def aligned_layout(contexts: Sequence[Tensor], window_start: int, window_len: int) -> Layout:
    """Context-Forcing teacher layout from the memories an AR student actually used: [union context | window].

    contexts: one per AR chunk of the window, the history indices that chunk's context held ([M_i] int64,
    e.g. ``ChunkRecord.context_idx[b]``; chunks inside the window may hold earlier window latents). The
    context is the union of them minus the window latents window_start..window_start+window_len-1, sorted;
    positions are contiguous (0..M-1, then the window). Unbatched: the union's size depends on the rollout.
    With the memory rule that built ``contexts`` this is :func:`teacher_layout` over the same poses.
    """
    if window_start < 0 or window_len < 1:
        raise ValueError(f"aligned_layout: need window_start >= 0 and window_len >= 1, got {window_start}, {window_len}")
    end = window_start + window_len
    flat = [c.reshape(-1) for c in contexts]
    dev = flat[0].device if flat else torch.device("cpu")
    idx = torch.cat(flat).long() if flat else torch.zeros(0, dtype=torch.long, device=dev)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= end):
        raise ValueError(f"aligned_layout: context indices must lie in [0, {end}) (before the window's end), got "
                         f"{int(idx.min())}..{int(idx.max())}")
    union = torch.unique(idx)  # sorted
    ctx = union[union < window_start]  # minus the window (nothing lies beyond its end)
    M = ctx.shape[0]
    indices = torch.cat([ctx, torch.arange(window_start, end, device=dev)])[None]
    return Layout(indices, _contiguous_positions(1, M, window_len, dev), M)


def position_span(memory: MemoryConfig, unit: int) -> int:
    """Temporal positions an AR sampler reaches: the largest context (max_context) plus one unit."""
    return memory.max_context + unit


def clamp_memory(memory: MemoryConfig, unit: int, span: int) -> MemoryConfig:
    """The memory config shrunk so max_context + unit <= span, recency first: the temporal window keeps as
    many latents as fit, then the anchor, then retrieved chunks get what is left. ValueError if no unit fits."""
    C = memory.chunk_size
    max_ctx = (span - unit) // C * C
    if max_ctx < 0:
        raise ValueError(f"a trained span of {span} positions cannot hold one unit of {unit} latents")
    if memory.max_context <= max_ctx:
        return memory
    temporal = min(memory.temporal_latents, max_ctx)
    anchor = memory.anchor and temporal + C <= max_ctx
    spatial = min(memory.spatial_chunks, (max_ctx - temporal - C * int(anchor)) // C)
    return replace(memory, max_context=max_ctx, temporal_latents=temporal, spatial_chunks=spatial, anchor=anchor,
                   fov_deg=list(memory.fov_deg), ref_offsets=list(memory.ref_offsets))


def sliding_window(memory: MemoryConfig, unit: int, span: int) -> MemoryConfig:
    """A recency-only memory (the last span - unit latents, no anchor, no retrieval): the layouts a model
    trained on contiguous windows (pretraining) has seen."""
    C = memory.chunk_size
    window = (span - unit) // C * C
    if window < 0:
        raise ValueError(f"a trained span of {span} positions cannot hold one unit of {unit} latents")
    return replace(memory, max_context=window, temporal_latents=window, spatial_chunks=0, anchor=False,
                   fov_deg=list(memory.fov_deg), ref_offsets=list(memory.ref_offsets))


def check_trained_span(memory: MemoryConfig, unit: int, mode: str, trained_span: Optional[int], where: str,
                       clamp: bool = False) -> MemoryConfig:
    """Refuse (or, with ``clamp``, shrink with a warning) an AR memory config that reaches positions training never saw.

    trained_span: positions 0..trained_span-1 were trained (None: unknown, nothing to check). Window mode
    (bidirectional teachers) is trained on the teacher layouts themselves, so only ``ar`` is checked.
    """
    if trained_span is None or mode != "ar":
        return memory
    span = position_span(memory, unit)
    if span <= trained_span:
        return memory
    msg = (f"{where}: sampling reaches temporal position {span - 1} (memory.max_context={memory.max_context} + "
           f"{unit} new latents) but training covered positions 0..{trained_span - 1}")
    if not clamp:
        raise ValueError(msg + "; lower sampling.memory.max_context / temporal_latents, or train on longer sequences")
    out = clamp_memory(memory, unit, trained_span)
    warnings.warn(f"{msg}; clamped memory to max_context={out.max_context}, temporal_latents={out.temporal_latents}, "
                  f"spatial_chunks={out.spatial_chunks}, anchor={out.anchor}", stacklevel=2)
    return out
