"""Per-block key/value cache for chunk-wise generation (research/worldplay.md §4.3).

Filled by :meth:`WorldDiT.fill_text_cache` (once per prompt) and :meth:`WorldDiT.fill_context_cache`
(once per generated chunk, over the reconstituted context), then read, never written, by every
denoising step of the current chunk (``model(x_chunk, ..., cache=cache)``).

Per block the cache holds the keys/values that precede the current chunk's own, already laid out in
attention order ``[text ; context]``. With a camera branch the RoPE and PRoPE branches share one
attention call (models/blocks.py), so keys/values carry ``2 x heads`` heads: the RoPE branch's
(keys rotated with the context's own temporal positions) then the PRoPE branch's (``P^-1 k``,
``P^-1 v``; text keys/values appear in both halves, untransformed). Replacing the context only drops
references, so it is cheap.

Each block's keys/values live in a buffer with room for the current chunk's own tokens after them:
a denoising step writes its keys/values there and attends over a view, instead of concatenating the
whole prefix anew in every block of every step (measured in benchmarks/RESULTS.md). The room is
sized by the longest chunk the cache has seen; writing in place is used only without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.attention import MaskSpec

__all__ = ["LayerKV", "KVCache"]


def _writable(*ts: Tensor) -> bool:
    """Buffered copies are safe: no tensor is part of an autograd graph (a copy would cut it), and no
    inference tensor is written outside inference mode."""
    if any(t.requires_grad for t in ts):
        return False
    return torch.is_inference_mode_enabled() or not any(t.is_inference() for t in ts)


def _cat_tokens(ts: list[Tensor]) -> Tensor:
    """[B, H, S_i, D] tensors joined along the tokens into token-major memory (dense key prefixes)."""
    return torch.cat([t.transpose(1, 2) for t in ts], dim=1).transpose(1, 2)


@dataclass(eq=False)
class LayerKV:
    """Keys/values of one block, each [B, heads, S, head_dim] (views of ``buf_k``/``buf_v`` when buffered)."""

    k: Tensor
    v: Tensor
    buf_k: Tensor | None = None  # [B, heads, capacity, head_dim] view of token-major memory, k = buf_k[:, :, :S]
    buf_v: Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @classmethod
    def joined(cls, parts: list["LayerKV | None"], room: int = 0) -> "LayerKV":
        """The parts in token order, copied into a buffer with ``room`` free tokens after them."""
        parts = [p for p in parts if p is not None]
        if room <= 0 or not _writable(*(t for p in parts for t in (p.k, p.v))):
            if len(parts) == 1:
                return parts[0]
            return cls(_cat_tokens([p.k for p in parts]), _cat_tokens([p.v for p in parts]))
        n = sum(p.length for p in parts)
        k0 = parts[0].k
        shape = (k0.shape[0], n + room, k0.shape[1], k0.shape[3])  # token-major, like the block's own keys
        buf_k, buf_v = k0.new_empty(shape).transpose(1, 2), k0.new_empty(shape).transpose(1, 2)
        s = 0
        for p in parts:
            buf_k[:, :, s:s + p.length].copy_(p.k)
            buf_v[:, :, s:s + p.length].copy_(p.v)
            s += p.length
        return cls(buf_k[:, :, :n], buf_v[:, :, :n], buf_k, buf_v)

    def extended(self, own: "LayerKV", room: int = 0) -> "LayerKV":
        """Keys/values of self followed by ``own``, then ``room`` free tokens: written into self's buffer when
        it has the space, else concatenated.

        Without the space (and without autograd) self is re-buffered first, so the next call with the
        same lengths writes in place. The result shares self's buffer.
        """
        n, m = self.length, own.length
        if not _writable(self.k, self.v, own.k, own.v):
            return LayerKV(_cat_tokens([self.k, own.k]), _cat_tokens([self.v, own.v]))
        if self.buf_k is None or self.buf_k.shape[2] < n + m + room:
            grown = LayerKV.joined([LayerKV(self.k, self.v)], room=m + room)
            self.k, self.v, self.buf_k, self.buf_v = grown.k, grown.v, grown.buf_k, grown.buf_v
        self.buf_k[:, :, n:n + m].copy_(own.k)
        self.buf_v[:, :, n:n + m].copy_(own.v)
        return LayerKV(self.buf_k[:, :, :n + m], self.buf_v[:, :, :n + m], self.buf_k, self.buf_v)


class KVCache:
    """Cached text and context keys/values of every block (create with ``model.new_cache()``)."""

    def __init__(self, depth: int):
        self.depth = depth
        self.text: list[LayerKV] | None = None  # per block, [B, H, L, D]
        self.text_mask: Tensor | None = None  # [B, L] bool, None = no padding
        self.layers: list[LayerKV] | None = None  # per block, [text ; context]
        self.context_frames = 0  # latent frames in the cached context
        self.tokens_per_frame = 0
        self.context_t_pos: Tensor | None = None  # [B, Tc] temporal positions given to the context
        self.room = 0  # tokens of the longest chunk attended with this cache: buffers keep room for them
        self._specs: dict = {}  # mask layouts of the current chunk, valid until the cache changes

    # ---- state ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        src = self.layers if self.layers is not None else self.text
        return None if src is None else src[0].k.shape[0]

    @property
    def text_len(self) -> int:
        return 0 if self.text is None else self.text[0].length

    @property
    def has_text(self) -> bool:
        return self.text_len > 0

    def prefix(self, block: int) -> LayerKV | None:
        """The keys/values the current chunk attends to before its own, for one block (None if empty)."""
        if self.layers is not None:
            return self.layers[block]
        if self.text is not None and self.text_len > 0:
            return self.text[block]
        return None

    def next_t_pos(self) -> Tensor | None:
        """[B] temporal position right after the context's last (None without context)."""
        if self.context_t_pos is None:
            return None
        return self.context_t_pos.max(dim=1).values + 1

    # ---- updates -------------------------------------------------------------------------
    def set_text(self, kv: list[LayerKV], text_mask: Tensor | None) -> None:
        """Store per-block text keys/values; drops the context (its keys depend on the text)."""
        if len(kv) != self.depth:
            raise ValueError(f"KVCache.set_text: got {len(kv)} blocks, cache has depth {self.depth}")
        self.text, self.text_mask = kv, text_mask
        self.clear_context()

    def set_context(self, layers: list[LayerKV], frames: int, tokens_per_frame: int, t_pos: Tensor) -> None:
        """Store per-block keys/values laid out as [cached text ; context] (the model joins them)."""
        if len(layers) != self.depth:
            raise ValueError(f"KVCache.set_context: got {len(layers)} blocks, cache has depth {self.depth}")
        expected = self.text_len + frames * tokens_per_frame
        if layers[0].length != expected:
            raise ValueError(f"KVCache.set_context: block 0 has {layers[0].length} keys, expected text "
                             f"{self.text_len} + {frames} frames x {tokens_per_frame} tokens = {expected}")
        self.layers = layers
        self.context_frames, self.tokens_per_frame, self.context_t_pos = frames, tokens_per_frame, t_pos
        self._specs = {}

    def repeat_interleave(self, n: int) -> "KVCache":
        """A cache whose batch element i holds this cache's element i // n (e.g. G RL candidates sharing one
        context fill); keys/values are copied once, in token-major memory like the block's own."""

        def rep(kv: LayerKV) -> LayerKV:
            return LayerKV(kv.k.transpose(1, 2).repeat_interleave(n, dim=0).transpose(1, 2),
                           kv.v.transpose(1, 2).repeat_interleave(n, dim=0).transpose(1, 2))

        out = KVCache(self.depth)
        out.text = None if self.text is None else [rep(kv) for kv in self.text]
        out.text_mask = None if self.text_mask is None else self.text_mask.repeat_interleave(n, dim=0)
        out.layers = None if self.layers is None else [rep(kv) for kv in self.layers]
        out.context_frames, out.tokens_per_frame, out.room = self.context_frames, self.tokens_per_frame, self.room
        out.context_t_pos = None if self.context_t_pos is None else self.context_t_pos.repeat_interleave(n, dim=0)
        return out

    def keep_context(self, frames: int) -> None:
        """Keep only the first ``frames`` latent frames of the cached context (views of the same buffers)."""
        if self.layers is None or not 0 < frames <= self.context_frames:
            raise ValueError(f"KVCache.keep_context: cannot keep {frames} of {self.context_frames} cached context frames")
        n = self.text_len + frames * self.tokens_per_frame
        self.layers = [LayerKV(kv.k[:, :, :n], kv.v[:, :, :n], kv.buf_k, kv.buf_v) for kv in self.layers]
        self.context_frames = frames
        self.context_t_pos = self.context_t_pos[:, :frames]
        self._specs = {}

    def clear_context(self) -> None:
        """Forget the context (keep the text); O(1)."""
        self.layers = None
        self.context_frames, self.tokens_per_frame, self.context_t_pos = 0, 0, None
        self._specs = {}

    def clear(self) -> None:
        """Forget everything."""
        self.text, self.text_mask = None, None
        self.clear_context()

    def spec(self, key: tuple, build) -> MaskSpec:
        """Memoised mask layout for the current chunk (shared by all steps until the cache changes)."""
        if key not in self._specs:
            self._specs[key] = build()
        return self._specs[key]
