"""Per-block key/value cache for chunk-wise generation (research/worldplay.md §4.3).

Filled by :meth:`WorldDiT.fill_text_cache` (once per prompt) and :meth:`WorldDiT.fill_context_cache`
(once per generated chunk, over the reconstituted context), then read, never written, by every
denoising step of the current chunk (``model(x_chunk, ..., cache=cache)``).

Per block the cache holds the keys/values that precede the current chunk's own, already laid out in
attention order ``[text ; context]``: RoPE-branch keys (rotated with the context's own temporal
positions) and values, and the PRoPE-branch keys/values (``P^-1 k``, ``P^-1 v``; text keys/values are
shared by both branches, untransformed). Replacing the context only drops references and
concatenates the new context after the stored text, so it is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.attention import MaskSpec

__all__ = ["LayerKV", "KVCache"]


@dataclass
class LayerKV:
    """Keys/values of one block, each [B, heads, S, head_dim]; the PRoPE pair is None without a camera branch."""

    k: Tensor
    v: Tensor
    k_prope: Tensor | None = None
    v_prope: Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def cat(self, other: "LayerKV") -> "LayerKV":
        """Keys/values of self followed by other (along the token axis)."""

        def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return None
            return torch.cat([a, b], dim=2)

        return LayerKV(join(self.k, other.k), join(self.v, other.v),
                       join(self.k_prope, other.k_prope), join(self.v_prope, other.v_prope))


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
