"""Double-stream (MM-DiT) block with per-frame AdaLN, QK RMSNorm, 3D RoPE and a parallel PRoPE pass.

Text and video tokens have separate weights (a :class:`Stream` each) and attend jointly: video
queries see [text ; cached context ; own video] keys, text queries see text keys only, so the text
stream never depends on the video and its keys/values can be cached once per prompt.

The video stream is modulated per latent frame (``vec`` [B, T, D], broadcast to the frame's tokens),
so every frame may carry its own noise level and action. With a camera branch, the same normalised
q/k/v (before RoPE) also go through a PRoPE attention pass (models/prope.py) whose output projection
starts at zero:  ``video += gate * (proj(attn_rope) + prope_proj(attn_prope))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import MaskSpec, attention
from models.kv_cache import LayerKV
from models.prope import transform_groups
from models.rope import apply_rope

__all__ = ["RMSNorm", "Stream", "FrameLayout", "DoubleStreamBlock", "FinalLayer"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """x [B, F*N, D] with per-frame shift/scale [B, F, D] -> x * (1 + scale) + shift, broadcast over N."""
    B, S, D = x.shape
    xv = x.view(B, frames, S // frames, D)
    return (xv * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, S, D)


def _gate(x: Tensor, gate: Tensor, frames: int) -> Tensor:
    """Per-frame gate [B, F, D] times x [B, F*N, D]."""
    B, S, D = x.shape
    return (x.view(B, frames, S // frames, D) * gate[:, :, None]).view(B, S, D)


class Stream(nn.Module):
    """One stream's weights: AdaLN (6 x D), QKV with QK RMSNorm, output projection, GELU-tanh MLP."""

    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: float, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.mod = nn.Linear(hidden, 6 * hidden)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))

    def modulation(self, vec: Tensor) -> list[Tensor]:
        """vec [B, F, D] -> [shift1, scale1, gate1, shift2, scale2, gate2], each [B, F, D]."""
        return list(self.mod(F.silu(vec)).chunk(6, dim=-1))

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised q, k and v, each [B, heads, S, head_dim]."""
        B, S, _ = x.shape
        qkv = self.qkv(_modulate(self.norm1(x), shift, scale, frames))
        q, k, v = qkv.view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def mlp_residual(self, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, frames: int) -> Tensor:
        return x + _gate(self.mlp(_modulate(self.norm2(x), shift, scale, frames)), gate, frames)


def _merge_heads(o: Tensor) -> Tensor:
    """[B, H, S, Dh] -> [B, S, H*Dh]."""
    B, H, S, Dh = o.shape
    return o.transpose(1, 2).reshape(B, S, H * Dh)


@dataclass
class FrameLayout:
    """What every block needs to know about the video tokens of one call (shared by all blocks)."""

    frames: int  # latent frames T
    tokens: int  # tokens per frame N
    cos: Tensor  # RoPE tables [B, 1, T*N, head_dim/2]
    sin: Tensor
    P: Tensor | None = None  # PRoPE projection matrices [B, T, 4, 4] (None: no camera branch)
    P_inv: Tensor | None = None
    spec: MaskSpec | None = None  # video queries vs [prefix ; own] keys
    text_spec: MaskSpec | None = None  # text queries vs text keys
    backend: str = "auto"


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: separate text / video weights, joint attention, optional PRoPE pass."""

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
        prefix: cached keys/values preceding the video's own ([text ; context]).
        Returns (new vid or None, new txt or None, this call's keys/values if ``want_kv``):
        for a text-only pass the text keys/values, otherwise the video's own.
        """
        if txt is not None:
            if self.txt is None:
                raise ValueError("DoubleStreamBlock: text tokens given to a block built without a text stream")
            if prefix is not None:
                raise ValueError("DoubleStreamBlock: pass text either live or through the cache, not both")
            m = self.txt.modulation(txt_vec[:, None])
            tq, tk, tv = self.txt.qkv_heads(txt, m[0], m[1], 1)
            prefix = LayerKV(tk, tv, tk, tv) if self.prope_proj is not None else LayerKV(tk, tv)
            if want_txt:
                o = attention(tq, tk, tv, layout.text_spec, layout.backend)
                txt = txt + _gate(self.txt.proj(_merge_heads(o)), m[2], 1)
                txt = self.txt.mlp_residual(txt, m[3], m[4], m[5], 1)
            else:
                txt = None
            if vid is None:
                return None, txt, prefix if want_kv else None
        if vid is None:
            raise ValueError("DoubleStreamBlock: nothing to do (no video and no text)")

        T = layout.frames
        m = self.vid.modulation(vec)
        q, k, v = self.vid.qkv_heads(vid, m[0], m[1], T)
        qr, kr = apply_rope(q, layout.cos, layout.sin), apply_rope(k, layout.cos, layout.sin)
        camera = self.prope_proj is not None
        if camera:
            if layout.P is None:
                raise ValueError("DoubleStreamBlock: camera branch needs projection matrices in the layout")
            qp = transform_groups(q, layout.P, layout.tokens, transpose=True)  # P^T q
            kp = transform_groups(k, layout.P_inv, layout.tokens)  # P^-1 k
            vp = transform_groups(v, layout.P_inv, layout.tokens)  # P^-1 v
            own = LayerKV(kr, v, kp, vp)
        else:
            own = LayerKV(kr, v)
        kv_out = own if want_kv else None
        if not want_vid:
            return None, txt, kv_out

        keys = own if prefix is None else prefix.cat(own)
        o = self.vid.proj(_merge_heads(attention(qr, keys.k, keys.v, layout.spec, layout.backend)))
        if camera:
            op = attention(qp, keys.k_prope, keys.v_prope, layout.spec, layout.backend)
            op = transform_groups(op, layout.P, layout.tokens)  # P · attn
            o = o + self.prope_proj(_merge_heads(op))
        vid = vid + _gate(o, m[2], T)
        vid = self.vid.mlp_residual(vid, m[3], m[4], m[5], T)
        return vid, txt, kv_out


class FinalLayer(nn.Module):
    """Per-frame AdaLN (shift, scale) + linear to patch channels; zero-initialised so the model starts at 0."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, vec: Tensor, frames: int) -> Tensor:
        shift, scale = self.mod(F.silu(vec)).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale, frames))
