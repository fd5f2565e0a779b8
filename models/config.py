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
    # The I2V channels of every latent carry the image turned into that latent's camera (models/warp.py): "off"
    # (the image at its own slot only), "patch" (RGB pixel-patch latents, resampled in pixels) or "latent" (VAE
    # latents, resampled on the latent grid). On the CPU demo "patch" gave +2.7 dB short PSNR and 12x the control
    # score (benchmarks/RESULTS.md, issue 14).
    image_warp: str = "off"
    # Per-token Plücker rays of each latent's camera added to the video tokens (models.embeddings.RayEmbed). Off by
    # default: on the CPU demo it lowered the loss and did not improve the videos (benchmarks/RESULTS.md, issue 14).
    rays: bool = False
    num_actions: int = 81
    qk_norm: bool = True  # RMSNorm on q and k per head
    qkv_bias: bool = True
    attn_backend: str = "auto"  # auto | sdpa | cudnn | flex | flash | masked (models/attention.py)
    grad_checkpointing: bool = False  # torch.utils.checkpoint (non-reentrant) around each block when training
    fuse: bool = True  # torch.compile the blocks' elementwise chains on CUDA (models/fused.py); eager on CPU
    # What the output means (models/flow.py): "x0" the clean sample (x-prediction; measured better for
    # pixel-patch latents, benchmarks/RESULTS.md "Issue 14") or "v" the velocity eps - x0 (HunyuanVideo's).
    prediction: str = "x0"
    # > 0 (x0 prediction only): the output is x̂0 = c_skip(σ)·x_σ + c_out(σ)·F with the EDM coefficients for this
    # data std (models/flow.skip_x0), so a nearly clean input passes through instead of being re-predicted.
    # Off by default: on the CPU demo it fixed low-σ denoising but made samples worse (benchmarks/RESULTS.md).
    skip_sigma_data: float = 0.0
    # ---- HunyuanVideo-1.5's conditioning streams (all off in our presets; models/convert turns them on) ----
    # With a vision or glyph stream the text input packs three streams along its tokens:
    # [vision_tokens SigLIP slots | byt5_tokens ByT5 slots | LLM tokens], each zero-padded to text_dim
    # channels, with one mask over all of them (models/text_encoders.pack_text_streams). Valid tokens keep
    # that order and padding stays masked in place: the order and masking of the released model's text stream.
    vision_dim: int = 0  # SigLIP token width (1152); 0 = no vision stream
    vision_tokens: int = 729  # slots of the vision stream at the head of the text input
    byt5_dim: int = 0  # ByT5 glyph token width (1472); 0 = no glyph stream
    byt5_tokens: int = 256  # slots of the glyph stream after the vision slots
    byt5_hidden: int = 2048  # width of the glyph mapper's two hidden layers
    cond_type_embed: bool = False  # a learned vector per stream (0 LLM, 1 ByT5, 2 vision) added to its tokens
    text_refiner_time: bool = False  # refiner modulation = pooled-text MLP + timestep MLP of the text noise level
    # Noise level that modulates the text stream (refiner and the blocks' text AdaLN): "zero" (WorldPlay's AR
    # models; the text is computed once per prompt and cached) or "video": the largest per-frame sigma of the
    # call (HunyuanVideo-1.5, WorldPlay's bidirectional model; the text cannot be cached).
    text_sigma: str = "zero"
    # Text queries also attend to the video's (RoPE-branch) keys, i.e. joint attention over [video ; text]
    # (HunyuanVideo-1.5, WorldPlay's bidirectional model). Bidirectional calls only; no text cache.
    text_attends_video: bool = False


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
# The released HunyuanVideo-1.5 / HY-WorldPlay checkpoints (models/convert): ``hy15`` plus the SigLIP vision
# projection (729 x 1152), the ByT5 glyph mapper (256 x 1472), the stream-type embedding and the refiner's
# timestep MLP, v-prediction; text modulated at sigma 0 and attending to text only (WorldPlay's AR models).
# Their bidirectional model and HunyuanVideo-1.5 itself add ``text_sigma="video"``, ``text_attends_video=True``.
PRESETS["hy15_released"] = replace(
    PRESETS["hy15"], vision_dim=1152, vision_tokens=729, byt5_dim=1472, byt5_tokens=256, byt5_hidden=2048,
    cond_type_embed=True, text_refiner_time=True, prediction="v",
)


def preset(name: str) -> WorldDiTConfig:
    """A fresh copy of the named preset (tiny | small | base | hy15 | hy15_released)."""
    if name not in PRESETS:
        raise KeyError(f"unknown WorldDiT preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, patch=list(cfg.patch), rope_dims=list(cfg.rope_dims))
