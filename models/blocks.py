"""Double-stream (MM-DiT) block with per-frame AdaLN, QK RMSNorm, 3D RoPE and a parallel PRoPE pass.

Text and video tokens have separate weights (a :class:`Stream` each) and attend jointly: video
queries see [text ; cached context ; own video] keys, text queries see text keys only, so the text
stream never depends on the video and its keys/values can be cached once per prompt.

The video stream is modulated per latent frame (``vec`` [B, T, D], broadcast to the frame's tokens),
so every frame may carry its own noise level and action. With a camera branch, the same normalised
q/k/v (before RoPE) also go through a PRoPE attention pass (models/prope.py) whose output projection
starts at zero:  ``video += gate * (proj(attn_rope) + prope_proj(attn_prope))``. The two passes share
one mask, so they run as one attention call over ``2 x heads`` heads (RoPE heads, then PRoPE heads):
one launch per key prefix instead of two, +6-10 % kernel throughput on H100 (benchmarks/RESULTS.md).
The elementwise chains around the matmuls live in models/fused.py (compiled on CUDA when
``fuse``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import MaskSpec, attention
from models.fused import attention_inputs, attention_outputs, gated_residual, norm_modulate, rms_norm
from models.kv_cache import LayerKV

__all__ = ["RMSNorm", "Stream", "FrameLayout", "DoubleStreamBlock", "FinalLayer"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Stream(nn.Module):
    """One stream's weights: AdaLN (6 x D), QKV with QK RMSNorm, output projection, GELU-tanh MLP."""

    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: float, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.mod = nn.Linear(hidden, 6 * hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.proj = nn.Linear(hidden, hidden)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))

    def modulation(self, vec: Tensor) -> list[Tensor]:
        """vec [B, F, D] -> [shift1, scale1, gate1, shift2, scale2, gate2], each [B, F, D]."""
        return list(self.mod(F.silu(vec)).chunk(6, dim=-1))

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor, layout: "FrameLayout", frames: int,
                  positions: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H', S, head_dim] ready for attention (see models/fused.attention_inputs).

        ``positions``: apply the layout's RoPE and, when it has cameras, stack the PRoPE heads (H' = 2H);
        otherwise (text) only the QK norm (H' = H).
        """
        B, S, _ = x.shape
        qkv = self.qkv(norm_modulate(x, shift, scale, frames, fuse=layout.fuse)).view(B, S, 3, self.heads, self.head_dim)
        qw, kw = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        eps = 1e-6 if self.q_norm is None else self.q_norm.eps
        cos, sin, P, P_inv = (layout.cos, layout.sin, layout.P, layout.P_inv) if positions else (None, None, None, None)
        return attention_inputs(qkv, qw, kw, cos, sin, P, P_inv, layout.tokens, eps, fuse=layout.fuse)

    def mlp_residual(self, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, frames: int, fuse: bool) -> Tensor:
        h = self.mlp(norm_modulate(x, shift, scale, frames, fuse=fuse))
        return gated_residual(x, h, gate, frames, fuse=fuse)


@dataclass
class FrameLayout:
    """What every block needs to know about the video tokens of one call (shared by all blocks)."""

    frames: int  # latent frames T
    tokens: int  # tokens per frame N
    cos: Tensor | None  # RoPE tables [B, 1, T*N, head_dim/2]
    sin: Tensor | None
    P: Tensor | None = None  # PRoPE projection matrices [B, T, 4, 4] (None: no camera branch)
    P_inv: Tensor | None = None
    spec: MaskSpec | None = None  # video queries vs [prefix ; own] keys
    text_spec: MaskSpec | None = None  # text queries vs text keys
    backend: str = "auto"
    fuse: bool = False  # run the elementwise chains through torch.compile on CUDA (models/fused.py)
    # Joint text attention (WorldDiTConfig.text_attends_video): text queries vs [text ; video RoPE-branch keys].
    joint_spec: MaskSpec | None = None


def _cat_heads(a: Tensor, b: Tensor) -> Tensor:
    """[B, H, S, D] x 2 -> [B, 2H, S, D] in token-major memory, like the video's keys."""
    return torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=2).transpose(1, 2)


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: separate text / video weights, joint attention, optional PRoPE heads."""

    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: float, *, text: bool, camera: bool,
                 qk_norm: bool = True, qkv_bias: bool = True):
        super().__init__()
        self.vid = Stream(hidden, heads, head_dim, mlp_ratio, qk_norm, qkv_bias)
        self.txt = Stream(hidden, heads, head_dim, mlp_ratio, qk_norm, qkv_bias) if text else None
        self.prope_proj = nn.Linear(hidden, hidden) if camera else None
        if self.prope_proj is not None:
            nn.init.zeros_(self.prope_proj.weight)
            nn.init.zeros_(self.prope_proj.bias)

    def forward(
        self,
        vid: Tensor | None,
        vec: Tensor | None,
        txt: Tensor | None,
        txt_vec: Tensor | None,
        layout: FrameLayout,
        prefix: LayerKV | None = None,
        want_vid: bool = True,
        want_txt: bool = True,
        want_kv: bool = False,
    ) -> tuple[Tensor | None, Tensor | None, LayerKV | None]:
        """One block.

        vid [B, T*N, D] with per-frame vec [B, T, D] (None: text-only pass, for the text cache);
        txt [B, L, D] with txt_vec [B, D] (None: text comes from ``prefix`` or there is none);
        prefix: cached keys/values preceding the video's own ([text ; context], H' heads).
        Returns (new vid or None, new txt or None, this call's keys/values if ``want_kv``):
        for a text-only pass the text keys/values, otherwise the video's own.
        """
        if layout.joint_spec is not None and txt is not None:
            return self._forward_joint(vid, vec, txt, txt_vec, layout, prefix, want_vid, want_txt, want_kv)
        camera = self.prope_proj is not None
        fuse = layout.fuse
        if txt is not None:
            if self.txt is None:
                raise ValueError("DoubleStreamBlock: text tokens given to a block built without a text stream")
            if prefix is not None:
                raise ValueError("DoubleStreamBlock: pass text either live or through the cache, not both")
            m = self.txt.modulation(txt_vec[:, None])
            tq, tk, tv = self.txt.qkv_heads(txt, m[0], m[1], layout, 1, positions=False)
            # video queries see the text keys in both branches: the PRoPE heads get them untransformed
            prefix = LayerKV(_cat_heads(tk, tk), _cat_heads(tv, tv)) if camera else LayerKV(tk, tv)
            if want_txt:
                o, _ = attention_outputs(attention(tq, tk, tv, layout.text_spec, layout.backend), None, 1, fuse=fuse)
                txt = gated_residual(txt, self.txt.proj(o), m[2], 1, fuse=fuse)
                txt = self.txt.mlp_residual(txt, m[3], m[4], m[5], 1, fuse)
            else:
                txt = None
            if vid is None:
                return None, txt, prefix if want_kv else None
        if vid is None:
            raise ValueError("DoubleStreamBlock: nothing to do (no video and no text)")
        if camera and layout.P is None:
            raise ValueError("DoubleStreamBlock: camera branch needs projection matrices in the layout")

        T = layout.frames
        m = self.vid.modulation(vec)
        q, k, v = self.vid.qkv_heads(vid, m[0], m[1], layout, T, positions=True)
        own = LayerKV(k, v)
        kv_out = own if want_kv else None
        if not want_vid:
            return None, txt, kv_out

        keys = own if prefix is None else prefix.extended(own)
        o, op = attention_outputs(attention(q, keys.k, keys.v, layout.spec, layout.backend),
                                  layout.P if camera else None, layout.tokens, fuse=fuse)
        y = self.vid.proj(o)
        if op is not None:
            y = y + self.prope_proj(op)
        vid = gated_residual(vid, y, m[2], T, fuse=fuse)
        vid = self.vid.mlp_residual(vid, m[3], m[4], m[5], T, fuse)
        return vid, txt, kv_out


    def _forward_joint(self, vid: Tensor | None, vec: Tensor | None, txt: Tensor, txt_vec: Tensor, layout: FrameLayout,
                       prefix: LayerKV | None, want_vid: bool, want_txt: bool, want_kv: bool
                       ) -> tuple[Tensor | None, Tensor | None, None]:
        """Joint attention (HunyuanVideo-1.5's double block): the video part as in :meth:`forward` (keys
        [text ; video]), and text queries attend to [text ; the video's RoPE-branch keys] (``layout.joint_spec``),
        so the text stream depends on the video and cannot be cached."""
        if vid is None or prefix is not None or want_kv:
            raise ValueError("DoubleStreamBlock: joint text attention needs live text and video and no cache")
        if self.txt is None:
            raise ValueError("DoubleStreamBlock: text tokens given to a block built without a text stream")
        fuse = layout.fuse
        mt = self.txt.modulation(txt_vec[:, None])
        tq, tk, tv = self.txt.qkv_heads(txt, mt[0], mt[1], layout, 1, positions=False)
        text_kv = LayerKV(_cat_heads(tk, tk), _cat_heads(tv, tv)) if self.prope_proj is not None else LayerKV(tk, tv)
        # want_kv: the video's own keys/values [B, H', S, Dh] (RoPE heads first) come back for the text queries.
        new_vid, _, own = self.forward(vid, vec, None, None, layout, text_kv, want_vid=want_vid, want_txt=False,
                                       want_kv=True)
        if not want_txt:
            return new_vid, None, None
        H = tq.shape[1]
        k = torch.cat([tk, own.k[:, :H]], dim=2)
        v = torch.cat([tv, own.v[:, :H]], dim=2)
        o, _ = attention_outputs(attention(tq, k, v, layout.joint_spec, layout.backend), None, 1, fuse=fuse)
        txt = gated_residual(txt, self.txt.proj(o), mt[2], 1, fuse=fuse)
        txt = self.txt.mlp_residual(txt, mt[3], mt[4], mt[5], 1, fuse)
        return new_vid, txt, None


class FinalLayer(nn.Module):
    """Per-frame AdaLN (shift, scale) + linear to patch channels; zero-initialised so the model starts at 0."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, vec: Tensor, frames: int, fuse: bool = False) -> Tensor:
        shift, scale = self.mod(F.silu(vec)).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, shift, scale, frames, fuse=fuse))
