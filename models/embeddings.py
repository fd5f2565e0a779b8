"""Input embeddings of the world DiT: noise level, discrete action, latent patches and text tokens."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from data.geometry import invert_rigid, pixel_rays
from models.attention import MaskSpec, attention

__all__ = [
    "sinusoidal_features",
    "TimestepEmbedder",
    "ActionEmbedder",
    "patchify",
    "unpatchify",
    "PatchEmbed",
    "TextRefinerBlock",
    "TextEmbedder",
    "VisionProjection",
    "GlyphMapper",
    "plucker_rays",
    "RayEmbed",
]

FREQ_DIM = 256


def sinusoidal_features(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [..., dim] (float32, [cos | sin]) of scalar values t [...]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Noise level sigma in [0, 1] -> [.., hidden]: sinusoidal features of t = 1000 sigma, then an MLP."""

    def __init__(self, hidden: int, scale: float = 1000.0):
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(sinusoidal_features(sigma * self.scale).to(self.mlp[0].weight.dtype))


class ActionEmbedder(nn.Module):
    """Discrete action id [...] (int64 in [0, num_actions)) -> [..., hidden].

    Sinusoidal features of the id, then an MLP whose last layer is zero-initialised, so a freshly
    added action embedder leaves the time embedding (and the whole network) unchanged.
    """

    def __init__(self, hidden: int, num_actions: int = 81):
        super().__init__()
        self.num_actions = num_actions
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, actions: Tensor) -> Tensor:
        return self.mlp(sinusoidal_features(actions).to(self.mlp[0].weight.dtype))


def patchify(x: Tensor, ph: int, pw: int) -> Tensor:
    """[B, C, T, H, W] -> tokens [B, T*(H/ph)*(W/pw), C*ph*pw], ordered (t, h, w)."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * (H // ph) * (W // pw), C * ph * pw)


def unpatchify(tokens: Tensor, T: int, h: int, w: int, ph: int, pw: int) -> Tensor:
    """Inverse of :func:`patchify`: [B, T*h*w, C*ph*pw] -> [B, C, T, h*ph, w*pw]."""
    B = tokens.shape[0]
    C = tokens.shape[-1] // (ph * pw)
    x = tokens.reshape(B, T, h, w, C, ph, pw)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, h * ph, w * pw)


class PatchEmbed(nn.Module):
    """Linear embedding of (1, ph, pw) latent patches (equivalent to a Conv3d with stride = kernel)."""

    def __init__(self, in_channels: int, hidden: int, ph: int, pw: int):
        super().__init__()
        self.ph, self.pw = ph, pw
        self.proj = nn.Linear(in_channels * ph * pw, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C_in, T, H, W] -> tokens [B, T*h*w, hidden] (in the weights' dtype)."""
        return self.proj(patchify(x.to(self.proj.weight.dtype), self.ph, self.pw))


def plucker_rays(w2c: Tensor, K: Tensor, h: int, w: int) -> Tensor:
    """Plücker coordinates (d, o × d) [B, T*h*w, 6] of the rays through the centres of an h×w token grid.

    w2c [B, T, 4, 4] world-to-camera; K [B, T, 3, 3] normalised intrinsics (fx/W, cx/W, ...: data.geometry).
    d is the unit world direction, o the camera centre; tokens ordered (t, h, w) as :func:`patchify`.
    """
    B, T = w2c.shape[:2]
    c2w = invert_rigid(w2c.float())
    d = F.normalize(pixel_rays(K, h, w) @ c2w[..., :3, :3].transpose(-1, -2), dim=-1)  # [B, T, N, 3]
    o = c2w[..., None, :3, 3].expand_as(d)
    return torch.cat([d, torch.cross(o, d, dim=-1)], dim=-1).reshape(B, T * h * w, 6)


class RayEmbed(nn.Module):
    """Per-token camera rays (Plücker coordinates, CameraCtrl-style) projected to the hidden width and added
    to the video tokens: where each token looks, in the first frame's world, as a dense input. Zero at init."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(6, hidden)

    def forward(self, w2c: Tensor, K: Tensor, h: int, w: int) -> Tensor:
        """[B, T*h*w, hidden] in the weights' dtype."""
        return self.proj(plucker_rays(w2c, K, h, w).to(self.proj.weight.dtype))


class TextRefinerBlock(nn.Module):
    """Pre-norm self-attention + MLP over text tokens, gated by the pooled-text vector (HunyuanVideo-style)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, hidden))
        self.gates = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        nn.init.zeros_(self.gates[1].weight)
        nn.init.zeros_(self.gates[1].bias)

    def forward(self, x: Tensor, c: Tensor, spec: MaskSpec, backend: str) -> Tensor:
        """x [B, L, D], c [B, D] -> [B, L, D]."""
        B, L, D = x.shape
        g_attn, g_mlp = self.gates(c)[:, None].chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, spec, backend).transpose(1, 2).reshape(B, L, D)
        x = x + g_attn * self.proj(a)
        return x + g_mlp * self.mlp(self.norm2(x))


class TextEmbedder(nn.Module):
    """Text tokens [B, L, text_dim] -> [B, L, hidden]: a projection, then refiner blocks.

    The refiner is modulated by an MLP of the mean of the valid input tokens, never by the video's
    noise level, so the text stream (and its keys/values) can be computed once per prompt. With
    ``time`` (HunyuanVideo-1.5's refiner) a timestep MLP of the text's own noise level ``sigma`` [B]
    is added to that vector (sigma None: 0).
    """

    def __init__(self, text_dim: int, hidden: int, heads: int, depth: int, mlp_ratio: float, qkv_bias: bool,
                 time: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(text_dim, hidden)
        self.pool = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(TextRefinerBlock(hidden, heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.time = TimestepEmbedder(hidden) if time else None

    def forward(self, text: Tensor, text_mask: Tensor | None, spec: MaskSpec, backend: str,
                sigma: Tensor | None = None) -> Tensor:
        text = text.to(self.in_proj.weight.dtype)
        if text_mask is None:
            pooled = text.mean(dim=1)
        else:
            w = text_mask.to(text.dtype)[..., None]
            pooled = (text * w).sum(1) / w.sum(1).clamp_min(1.0)
        c = self.pool(pooled)
        if self.time is not None:
            c = self.time(text.new_zeros(text.shape[0]) if sigma is None else sigma.float()) + c
        x = self.in_proj(text)
        for blk in self.blocks:
            x = blk(x, c, spec, backend)
        return x


class VisionProjection(nn.Module):
    """SigLIP image tokens [B, N, vision_dim] -> [B, N, hidden] (HunyuanVideo-1.5's semantic image stream).

    LayerNorm, Linear (vision_dim -> vision_dim), exact GELU, Linear (-> hidden), LayerNorm; both
    norms affine with PyTorch's default eps (1e-5), as in the released model.
    """

    def __init__(self, vision_dim: int, hidden: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(vision_dim)
        self.fc1 = nn.Linear(vision_dim, vision_dim)
        self.fc2 = nn.Linear(vision_dim, hidden)
        self.norm_out = nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.fc1.weight.dtype)
        return self.norm_out(self.fc2(F.gelu(self.fc1(self.norm_in(x)))))


class GlyphMapper(nn.Module):
    """ByT5 glyph tokens [B, N, byt5_dim] -> [B, N, hidden]: LayerNorm, then three Linear layers with exact GELU
    between them (byt5_dim -> width -> width -> hidden), HunyuanVideo-1.5's glyph mapper without residual."""

    def __init__(self, byt5_dim: int, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(byt5_dim)
        self.fc1 = nn.Linear(byt5_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.fc1.weight.dtype)
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))
