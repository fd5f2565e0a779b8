"""WorldDiT configuration: one typed dataclass and its named presets (registered with Hydra by the lead)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["WorldDiTConfig", "preset", "PRESETS"]


@dataclass
class WorldDiTConfig:
    """Shape and switches of the world DiT (see models/dit.py).

    Every field has a default and a Hydra-friendly type. ``hidden`` must equal ``heads * head_dim``;
    ``rope_dims`` (t, h, w) must be even and sum to ``head_dim``; ``head_dim`` must be a multiple of 4
    when ``camera`` is on (PRoPE acts on groups of 4 channels).
    """

    latent_channels: int = 16  # C: 16 (tiny/small, Wan2.1 VAE), 32 (HunyuanVideo-1.5 VAE)
    i2v: bool = True  # input = [noisy C, first-frame latent C (where cond_mask), mask 1] = 2C+1 channels
    hidden: int = 64
    depth: int = 2  # number of double-stream blocks
    heads: int = 4
    head_dim: int = 16
    mlp_ratio: float = 4.0  # GELU-tanh MLP width = mlp_ratio * hidden
    patch: list[int] = field(default_factory=lambda: [1, 1, 1])  # (t, h, w); t must be 1 (per-latent conditioning)
    rope_dims: list[int] = field(default_factory=lambda: [4, 6, 6])  # (t, h, w) channels of the 3D RoPE
    rope_theta: float = 256.0
    text_dim: int = 32  # width of incoming text tokens; 0 = no text stream
    text_refiner_depth: int = 1  # self-attention refiner blocks on text tokens before the double blocks
    action: bool = True  # discrete 81-class action embedding added to the per-frame time embedding
    camera: bool = True  # PRoPE branch (continuous camera)
    num_actions: int = 81
    qk_norm: bool = True  # RMSNorm on q and k per head
    qkv_bias: bool = True
    attn_backend: str = "auto"  # auto | sdpa | cudnn | flex | flash | masked (models/attention.py)
    grad_checkpointing: bool = False  # torch.utils.checkpoint (non-reentrant) around each block when training
    fuse: bool = True  # torch.compile the blocks' elementwise chains on CUDA (models/fused.py); eager on CPU


PRESETS: dict[str, WorldDiTConfig] = {
    # 0.43M parameters: the same code as hy15 at a size that runs a forward in milliseconds on CPU.
    "tiny": WorldDiTConfig(),
    # 161M parameters: single-GPU research runs on the synthetic world / ViZDoom.
    "small": WorldDiTConfig(
        latent_channels=16, hidden=640, depth=10, heads=10, head_dim=64, rope_dims=[16, 24, 24],
        text_dim=768, text_refiner_depth=1,
    ),
    # 1.31B parameters: a Wan-1.3B-sized model for multi-GPU pretraining from scratch.
    "base": WorldDiTConfig(
        latent_channels=32, hidden=1536, depth=14, heads=12, head_dim=128, rope_dims=[32, 48, 48],
        text_dim=3584, text_refiner_depth=2,
    ),
    # HunyuanVideo-1.5 480p I2V as used by WorldPlay: 54 double blocks, hidden 2048, 16 x 128 heads,
    # RoPE [16, 56, 56], 65 input channels (2 x 32 + 1), patch 1, MLP x4 GELU-tanh, Qwen2.5-VL text (3584).
    # Parameter count (meta device, tests/test_dit.py): 8.307B without the WorldPlay additions, i.e.
    # 54 x 151.0M double blocks (two streams of AdaLN 6x, QKV, proj, MLP) + a 136M text embedder
    # (3584->2048 projection, pooled-text MLP, 2 refiner blocks) + patch/time embedders and final layer.
    # HunyuanVideo-1.5 has 8.33B: its ByT5 glyph mapper (11M) and SigLIP projection (4M) are not separate
    # modules here, since all text-like tokens arrive in one ``text_dim`` stream. The WorldPlay additions
    # are ~0.23B: the action embedder (256->2048->2048, 4.7M) and 54 PRoPE output projections
    # (2048^2 + 2048 each, 226.6M): 8.538B in all.
    "hy15": WorldDiTConfig(
        latent_channels=32, hidden=2048, depth=54, heads=16, head_dim=128, rope_dims=[16, 56, 56],
        text_dim=3584, text_refiner_depth=2,
    ),
}


def preset(name: str) -> WorldDiTConfig:
    """A fresh copy of the named preset (tiny | small | base | hy15)."""
    if name not in PRESETS:
        raise KeyError(f"unknown WorldDiT preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, patch=list(cfg.patch), rope_dims=list(cfg.rope_dims))
