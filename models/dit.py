"""WorldDiT: the action- and camera-conditioned world model network (HunyuanVideo-1.5 family).

Input: noisy latents [B, C, T, H, W] with one noise level per latent frame, plus optional discrete
actions, cameras (w2c + normalised K) for the PRoPE branch, explicit temporal RoPE positions, text
tokens and the first-frame latent (I2V channel concat). Output: the raw prediction, read through
``cfg.prediction`` (models/flow.py): the clean sample x̂0 ("x0") or the velocity eps - x0 ("v").

Attention modes: bidirectional (``chunk_size=None``), block-causal over chunks of ``chunk_size``
latents, and cached (``cache=...``: the chunk attends to cached text + context keys/values).

Conventions and choices (deviations from the brief are listed here):

* Missing conditioning is the null, never an error: ``actions=None`` means action 0 ("no keys") for
  every frame; ``w2c=None`` means identity cameras (no relative information reaches PRoPE); ``text``
  None or empty means no text tokens; ``image_latent=None`` means zero cond channels and mask 0.
  Conditioning for a disabled branch (``actions`` with ``action=False``, ``w2c`` with
  ``camera=False``) is ignored, so every ablation runs on the same batches.
* ``w2c`` given without ``K`` is an error (the projection needs intrinsics).
* ``image_latent`` needs ``cond_mask`` [B, T]: which latents carry the image in the conditioning
  channels. The one definition of that slot is ``models.layout.image_slots`` (video latent 0), used
  by the training stages and the rollout sampler alike; the network never guesses it.
* ``patch[0]`` (temporal patch) must be 1: merging latents would merge their noise levels, actions
  and cameras, which the per-frame design forbids.
* With ``cache``, text comes from the cache (passing ``text`` raises); the default ``t_pos``
  continues after the cached context's positions.
* The cache is filled through ``forward`` (``fill=...``, used by :meth:`fill_text_cache` and
  :meth:`fill_context_cache`), so FSDP2's forward hooks gather parameters for those calls too.
* With ``text_mask`` the auto attention backend on GPU is flex (key padding); pass ``text_mask=None``
  when no token is padding to keep the dense cuDNN path (``fill_text_cache`` drops an all-True mask
  itself).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.attention import BACKENDS, MaskSpec
from models.blocks import DoubleStreamBlock, FinalLayer, FrameLayout
from models.config import WorldDiTConfig
from models.flow import PREDICTIONS, skip_x0
from models.warp import check_image_warp, warp_into_cameras
from models.embeddings import ActionEmbedder, PatchEmbed, RayEmbed, TextEmbedder, TimestepEmbedder, unpatchify
from models.embeddings import GlyphMapper, VisionProjection
from models.kv_cache import KVCache, LayerKV
from models.prope import identity_cameras, projection_matrices
from models.rope import rope_tables

__all__ = ["WorldDiT", "KVCache", "validate_config"]


def validate_config(cfg: WorldDiTConfig) -> None:
    """Raise ValueError naming the field when the configuration cannot build a network."""
    def bad(field: str, why: str) -> None:
        raise ValueError(f"WorldDiTConfig.{field}: {why}")

    if cfg.hidden != cfg.heads * cfg.head_dim:
        bad("hidden", f"{cfg.hidden} != heads ({cfg.heads}) x head_dim ({cfg.head_dim})")
    if len(cfg.rope_dims) != 3 or sum(cfg.rope_dims) != cfg.head_dim or any(d % 2 for d in cfg.rope_dims):
        bad("rope_dims", f"{list(cfg.rope_dims)} must be three even numbers summing to head_dim {cfg.head_dim}")
    if len(cfg.patch) != 3 or any(p < 1 for p in cfg.patch):
        bad("patch", f"{list(cfg.patch)} must be three positive ints (t, h, w)")
    if cfg.patch[0] != 1:
        bad("patch", "temporal patch must be 1 (each latent frame carries its own noise level, action and camera)")
    if cfg.camera and cfg.head_dim % 4:
        bad("head_dim", f"{cfg.head_dim} must be a multiple of 4 for the PRoPE branch (camera=True)")
    if cfg.prediction not in PREDICTIONS:
        bad("prediction", f"{cfg.prediction!r} is not one of {PREDICTIONS}")
    try:
        check_image_warp(cfg.image_warp, cfg.latent_channels)
    except ValueError as e:
        raise ValueError(f"WorldDiTConfig: {e}") from None
    if cfg.image_warp != "off" and not cfg.i2v:
        bad("image_warp", "needs i2v (the image channels it fills)")
    if cfg.skip_sigma_data < 0 or (cfg.skip_sigma_data > 0 and cfg.prediction != "x0"):
        bad("skip_sigma_data", f"{cfg.skip_sigma_data} needs prediction 'x0' and a value >= 0 (0 = off)")
    if cfg.attn_backend not in BACKENDS:
        bad("attn_backend", f"{cfg.attn_backend!r} is not one of {BACKENDS}")
    for f in ("latent_channels", "depth", "heads", "num_actions"):
        if getattr(cfg, f) < 1:
            bad(f, f"must be >= 1, got {getattr(cfg, f)}")
    if cfg.text_dim < 0 or cfg.text_refiner_depth < 0:
        bad("text_dim", "text_dim and text_refiner_depth must be >= 0")
    for f in ("vision_dim", "byt5_dim"):
        if getattr(cfg, f) < 0 or getattr(cfg, f) > cfg.text_dim:
            bad(f, f"{getattr(cfg, f)} must lie in [0, text_dim={cfg.text_dim}] (its tokens are packed into the text input)")
    for f, on in (("vision_tokens", cfg.vision_dim), ("byt5_tokens", cfg.byt5_dim), ("byt5_hidden", cfg.byt5_dim)):
        if on and getattr(cfg, f) < 1:
            bad(f, f"must be >= 1 when its stream is on, got {getattr(cfg, f)}")
    if cfg.text_sigma not in ("zero", "video"):
        bad("text_sigma", f"{cfg.text_sigma!r} is not one of ('zero', 'video')")
    if cfg.text_dim == 0 and (cfg.vision_dim or cfg.byt5_dim or cfg.cond_type_embed or cfg.text_refiner_time
                              or cfg.text_attends_video):
        bad("text_dim", "the text streams (vision_dim, byt5_dim, cond_type_embed, text_refiner_time, "
                        "text_attends_video) need a text stream (text_dim > 0)")


def _chunk_segments(frames: int, tokens: int, chunk_size: int | None, first_chunk: int = 0) -> list[tuple[int, int]]:
    """(length, chunk id) segments of ``frames`` latent frames: one chunk, or chunks of chunk_size frames."""
    if frames == 0:
        return []
    if chunk_size is None:
        return [(frames * tokens, first_chunk)]
    return [(min(chunk_size, frames - s) * tokens, first_chunk + i) for i, s in enumerate(range(0, frames, chunk_size))]


class WorldDiT(nn.Module):
    """Double-stream DiT with per-frame AdaLN (noise level + action), 3D RoPE on explicit positions and PRoPE."""

    def __init__(self, cfg: WorldDiTConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        C = cfg.latent_channels
        self.in_channels = 2 * C + 1 if cfg.i2v else C
        _, ph, pw = cfg.patch
        self.patch_embed = PatchEmbed(self.in_channels, cfg.hidden, ph, pw)
        self.time_embed = TimestepEmbedder(cfg.hidden)
        self.action_embed = ActionEmbedder(cfg.hidden, cfg.num_actions) if cfg.action else None
        self.ray_embed = RayEmbed(cfg.hidden) if cfg.rays else None
        self.text_embed = (
            TextEmbedder(cfg.text_dim, cfg.hidden, cfg.heads, cfg.text_refiner_depth, cfg.mlp_ratio, cfg.qkv_bias,
                         time=cfg.text_refiner_time)
            if cfg.text_dim > 0 else None
        )
        # HunyuanVideo-1.5's other conditioning streams, built only when the config asks for them.
        if cfg.vision_dim:
            self.vision_embed = VisionProjection(cfg.vision_dim, cfg.hidden)
        if cfg.byt5_dim:
            self.byt5_embed = GlyphMapper(cfg.byt5_dim, cfg.byt5_hidden, cfg.hidden)
        if cfg.cond_type_embed:
            self.cond_type = nn.Embedding(3, cfg.hidden)  # 0 LLM, 1 ByT5, 2 vision
        self.blocks = nn.ModuleList(
            DoubleStreamBlock(cfg.hidden, cfg.heads, cfg.head_dim, cfg.mlp_ratio, text=cfg.text_dim > 0,
                              camera=cfg.camera, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias)
            for _ in range(cfg.depth)
        )
        self.final = FinalLayer(cfg.hidden, C * ph * pw)
        self._spec_memo: dict = {}
        self.reset_parameters()

    # ---- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT-style init: xavier linears, zero biases, adaLN-Zero modulation, zero output layer.

        The action embedder's last layer and every PRoPE output projection are zero, so enabling
        either branch leaves a network's function unchanged at initialisation.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        embedders = [self.time_embed] + ([self.action_embed] if self.action_embed is not None else [])
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        zero = [self.final.mod, self.final.linear] + ([self.ray_embed.proj] if self.ray_embed is not None else [])
        if self.action_embed is not None:
            zero.append(self.action_embed.mlp[2])
        for blk in self.blocks:
            zero += [s.mod for s in (blk.vid, blk.txt) if s is not None]
            if blk.prope_proj is not None:
                zero.append(blk.prope_proj)
        if self.text_embed is not None:
            zero += [b.gates[1] for b in self.text_embed.blocks]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if getattr(self.text_embed, "time", None) is not None:
            nn.init.normal_(self.text_embed.time.mlp[0].weight, std=0.02)
            nn.init.normal_(self.text_embed.time.mlp[2].weight, std=0.02)
        if self.cfg.cond_type_embed:
            nn.init.zeros_(self.cond_type.weight)  # adding the stream types changes nothing at initialisation

    def new_cache(self) -> KVCache:
        """An empty KV cache for chunk-wise generation."""
        return KVCache(self.cfg.depth)

    # ---- input preparation ---------------------------------------------------------------------
    def _check_video(self, x: Tensor, sigma: Tensor, actions, w2c, K, t_pos, image_latent, cond_mask) -> None:
        C = self.cfg.latent_channels
        _, ph, pw = self.cfg.patch
        if x.dim() != 5 or x.shape[1] != C:
            raise ValueError(f"WorldDiT: x must be [B, {C}, T, H, W], got {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        if H % ph or W % pw:
            raise ValueError(f"WorldDiT: latent size {H}x{W} is not divisible by the patch {ph}x{pw}")
        if sigma.shape != (B, T):
            raise ValueError(f"WorldDiT: sigma must be [B, T] = [{B}, {T}], got {tuple(sigma.shape)}")
        for name, t, shape in (("actions", actions, (B, T)), ("t_pos", t_pos, (B, T)),
                               ("w2c", w2c, (B, T, 4, 4)), ("K", K, (B, T, 3, 3)), ("cond_mask", cond_mask, (B, T)),
                               ("image_latent", image_latent, (B, C, H, W))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"WorldDiT: {name} must be {list(shape)}, got {tuple(t.shape)}")
        for name, t in (("actions", actions), ("t_pos", t_pos)):
            if t is not None and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise ValueError(f"WorldDiT: {name} must be an integer tensor, got {t.dtype}")
        if image_latent is not None and not self.cfg.i2v:
            raise ValueError("WorldDiT: image_latent given but the config has i2v=False")
        if image_latent is not None and cond_mask is None:
            raise ValueError("WorldDiT: image_latent needs cond_mask [B, T] (the image's slot: models.layout.image_slots)")
        if w2c is not None and K is None and self.cfg.camera:
            raise ValueError("WorldDiT: w2c given without K (normalised intrinsics [B, T, 3, 3])")

    def _image_views(self, image_latent: Tensor | None, T: int, w2c: Tensor | None, K: Tensor | None) -> Tensor | None:
        """With ``image_warp``: the image as each latent's camera sees it [B, C, T, h, w] (models/warp.py)."""
        if self.cfg.image_warp == "off" or image_latent is None:
            return None
        if w2c is None:  # no cameras (the null input): every latent sees the image as it is
            return image_latent[:, :, None].expand(-1, -1, T, -1, -1)
        return warp_into_cameras(image_latent, w2c, K, self.cfg.image_warp)

    def _input(self, x: Tensor, image_latent: Tensor | None, cond_mask: Tensor | None,
               views: Tensor | None = None) -> Tensor:
        """[noisy C, cond C, mask 1] channels (I2V) or x itself. cond is the image at its slot, or with
        ``views`` [B, C, T, h, w] (image_warp) the image seen from every latent's camera."""
        if not self.cfg.i2v:
            return x
        B, C, T, H, W = x.shape
        if image_latent is None:
            zeros = x.new_zeros(B, C + 1, T, H, W)
            return torch.cat([x, zeros], dim=1)
        m = cond_mask.bool().to(x.dtype)[:, None, :, None, None]  # [B, 1, T, 1, 1]
        cond = image_latent.to(x.dtype)[:, :, None] * m if views is None else views.to(x.dtype)
        return torch.cat([x, cond, m.expand(B, 1, T, H, W)], dim=1)

    def _frame_vec(self, sigma: Tensor, actions: Tensor | None) -> Tensor:
        """Per-latent-frame conditioning vector [B, T, D] = time_embed(sigma) + action_embed(action)."""
        vec = self.time_embed(sigma.float())
        if self.action_embed is not None:
            if actions is None:
                actions = torch.zeros_like(sigma, dtype=torch.long)
            vec = vec + self.action_embed(actions)
        return vec

    def _cameras(self, B: int, T: int, w2c: Tensor | None, K: Tensor | None, device) -> tuple[Tensor | None, Tensor | None]:
        if not self.cfg.camera:
            return None, None
        if w2c is None:
            return identity_cameras(B, T, device)
        return projection_matrices(w2c, K)

    def _ray_cameras(self, B: int, T: int, w2c: Tensor | None, K: Tensor | None, device) -> tuple[Tensor, Tensor]:
        """(w2c, K) for the ray embedding: the given cameras, or the null camera (identity pose, 90° view)."""
        if w2c is not None:
            return w2c, K
        K0 = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], device=device)
        return torch.eye(4, device=device).expand(B, T, 4, 4), K0.expand(B, T, 3, 3)

    def _text_vec(self, B: int, device: torch.device, sigma: Tensor | None = None) -> Tensor:
        """Text-stream modulation [B, D]: the time embedding at sigma = 0, independent of the video (or at
        ``sigma`` [B], the text's noise level under ``text_sigma="video"``)."""
        return self.time_embed(torch.zeros(B, device=device) if sigma is None else sigma.float())

    def _text_sigma(self, sigma: Tensor) -> Tensor | None:
        """The text stream's noise level [B] (``text_sigma="video"``: the call's largest per-frame sigma), or None (0)."""
        return sigma.float().amax(dim=1) if self.cfg.text_sigma == "video" else None

    def _text_spec(self, L: int, text_mask: Tensor | None) -> MaskSpec:
        return MaskSpec(((L, -1),), ((L, -1),), False, text_mask, text_mask)

    def _video_spec(self, text_len: int, text_mask: Tensor | None, ctx: list, own: list, causal: bool,
                    memo: dict | None) -> MaskSpec:
        """Video queries (``own`` segments) vs keys [text ; ctx ; own]; memoised without padding."""
        key = (text_len, tuple(ctx), tuple(own), causal)
        if text_mask is None and memo is not None and key in memo:
            return memo[key]
        k_segments = ([(text_len, -1)] if text_len else []) + list(ctx) + list(own)
        k_valid = None
        if text_mask is not None and text_len:
            S = sum(n for n, _ in k_segments)
            k_valid = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], S - text_len, dtype=torch.bool)], 1)
        spec = MaskSpec(tuple(own), tuple(k_segments), causal, k_valid, None)
        if text_mask is None and memo is not None:
            if len(memo) > 32:
                memo.clear()
            memo[key] = spec
        return spec

    def _run(self, blk: nn.Module, *args, **kwargs):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False, **kwargs)
        return blk(*args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        *,
        actions: Tensor | None = None,
        w2c: Tensor | None = None,
        K: Tensor | None = None,
        t_pos: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        image_latent: Tensor | None = None,
        cond_mask: Tensor | None = None,
        chunk_size: int | None = None,
        cache: KVCache | None = None,
        fill: str | None = None,
        causal: bool = True,
    ) -> Tensor | None:
        """Raw prediction [B, C, T, H, W] (x̂0 or eps - x0 per cfg.prediction) for noisy latents x [B, C, T, H, W].

        sigma [B, T] per-latent noise level in [0, 1]; actions [B, T] int64 in [0, num_actions);
        w2c [B, T, 4, 4]; K [B, T, 3, 3] normalised intrinsics; t_pos [B, T] int temporal positions
        (default arange(T), or continuing after a cached context); text [B, L, text_dim] with
        text_mask [B, L] bool; image_latent [B, C, H, W] placed where cond_mask [B, T] is set;
        chunk_size None = bidirectional, else block-causal over chunks of that many latents;
        cache: attend to cached text/context keys/values (the cache is not modified).
        ``fill`` ("text" | "context" | "extend", with ``causal``) is internal: use fill_text_cache / fill_context_cache.
        """
        if fill == "text":
            return self._fill_text(cache, text, text_mask)
        if fill not in (None, "context", "extend"):
            raise ValueError(f"WorldDiT: fill must be None, 'text', 'context' or 'extend', got {fill!r}")
        filling = fill in ("context", "extend")
        if x is None or sigma is None:
            raise ValueError("WorldDiT: x and sigma are required")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"WorldDiT: chunk_size must be >= 1 or None, got {chunk_size}")
        self._check_video(x, sigma, actions, w2c, K, t_pos, image_latent, cond_mask)
        B, C, T, H, W = x.shape
        _, ph, pw = self.cfg.patch
        h, w = H // ph, W // pw
        N = h * w
        dev = x.device

        if cache is not None:
            if text is not None or text_mask is not None:
                raise ValueError("WorldDiT: with a cache, text comes from fill_text_cache; do not pass text")
            if cache.depth != self.cfg.depth:
                raise ValueError(f"WorldDiT: cache depth {cache.depth} != model depth {self.cfg.depth}")
            if cache.batch_size is not None and cache.batch_size != B:
                raise ValueError(f"WorldDiT: cache holds batch {cache.batch_size}, x has batch {B}")
            if fill is None and cache.context_frames and cache.tokens_per_frame != N:
                raise ValueError(f"WorldDiT: cached context has {cache.tokens_per_frame} tokens per frame, x has {N}")
        if t_pos is None:
            base = cache.next_t_pos() if (cache is not None and fill is None) else None
            ar = torch.arange(T, device=dev)
            t_pos = ar.expand(B, T) if base is None else base[:, None] + ar
        vid = self.patch_embed(self._input(x, image_latent, cond_mask, self._image_views(image_latent, T, w2c, K)))
        if self.ray_embed is not None:
            vid = vid + self.ray_embed(*self._ray_cameras(B, T, w2c, K, dev), h, w)
        vec = self._frame_vec(sigma, actions)
        cos, sin = rope_tables(t_pos, h, w, self.cfg.rope_dims, self.cfg.rope_theta)
        P, P_inv = self._cameras(B, T, w2c, K, dev)
        backend = self.cfg.attn_backend

        txt = txt_vec = None
        text_spec = None
        if cache is not None:
            text_len, tmask = cache.text_len, cache.text_mask
        else:
            if text is not None and text.shape[1] == 0:
                text, text_mask = None, None
            if text is not None:
                txt, text_spec = self._embed_text(text, text_mask, self._text_sigma(sigma))
                txt_vec = self._text_vec(B, dev, self._text_sigma(sigma))
            text_len, tmask = (0, None) if text is None else (text.shape[1], text_mask)

        if fill == "context":  # keys [text ; context], block-causal or full among context chunks
            if cache is None:
                raise ValueError("WorldDiT: fill='context' needs a cache")
            if causal and chunk_size is None:
                raise ValueError("WorldDiT.fill_context_cache: causal=True needs chunk_size")
            own = _chunk_segments(T, N, chunk_size if causal else None)
            spec = self._video_spec(text_len, tmask, [], own, causal, None)
        elif cache is not None:  # keys [text ; context (chunk 0) ; own chunks 1..] (a step, or extending a context)
            ctx = _chunk_segments(cache.context_frames, cache.tokens_per_frame, None)
            own = _chunk_segments(T, N, chunk_size, first_chunk=1)
            key = (T, N, chunk_size)
            spec = cache.spec(key, lambda: self._video_spec(text_len, tmask, ctx, own, chunk_size is not None, None))
        else:
            own = _chunk_segments(T, N, chunk_size)
            spec = self._video_spec(text_len, tmask, [], own, chunk_size is not None, self._spec_memo)
        layout = FrameLayout(T, N, cos, sin, P, P_inv, spec, text_spec, backend, self.cfg.fuse)
        if self.cfg.text_attends_video and txt is not None:
            layout.joint_spec = self._joint_spec(text_len, tmask, T * N, chunk_size)
        if cache is not None and fill is None:
            cache.room = max(cache.room, T * N)  # later context fills leave room for chunks this long

        kvs: list[LayerKV] = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            prefix = cache.prefix(i) if cache is not None else None
            want_vid = not (filling and i == last)  # the last block's output is never used there
            vid, txt, kv = self._run(blk, vid, vec, txt, txt_vec, layout, prefix,
                                     want_vid=want_vid, want_txt=i < last, want_kv=filling)
            if kv is not None:  # join with the prefix now, so only one block's extra copy is alive at a time
                if fill == "extend":  # in place after the kept context when its buffer has the space
                    kvs.append(prefix.extended(kv, room=cache.room))
                else:
                    kvs.append(LayerKV.joined([prefix, kv], room=cache.room))
        if fill == "context":
            cache.set_context(kvs, T, N, t_pos)
            return None
        if fill == "extend":
            cache.set_context(kvs, cache.context_frames + T, N, torch.cat([cache.context_t_pos, t_pos], dim=1))
            return None
        out = unpatchify(self.final(vid, vec, T, self.cfg.fuse), T, h, w, ph, pw)
        if self.cfg.skip_sigma_data > 0:
            out = skip_x0(out.float(), x.float(), sigma, self.cfg.skip_sigma_data)
        return out.to(x.dtype)

    def _embed_text(self, text: Tensor, text_mask: Tensor | None,
                    text_sigma: Tensor | None = None) -> tuple[Tensor, MaskSpec]:
        if self.text_embed is None:
            raise ValueError("WorldDiT: text given but the config has text_dim=0")
        if text.dim() != 3 or text.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"WorldDiT: text must be [B, L, {self.cfg.text_dim}], got {tuple(text.shape)}")
        if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool):
            raise ValueError(f"WorldDiT: text_mask must be bool {list(text.shape[:2])}, got {text_mask.dtype} "
                             f"{tuple(text_mask.shape)}")
        spec = self._text_spec(text.shape[1], text_mask)
        if self.cfg.vision_dim or self.cfg.byt5_dim or self.cfg.cond_type_embed:
            return self._embed_streams(text, text_mask, text_sigma), spec
        return self.text_embed(text, text_mask, spec, self.cfg.attn_backend, text_sigma), spec

    def _embed_streams(self, text: Tensor, text_mask: Tensor | None, text_sigma: Tensor | None) -> Tensor:
        """Packed streams [B, V + G + L, text_dim] ([vision | ByT5 | LLM] slots) -> tokens [B, V + G + L, hidden].

        Vision slots go through the SigLIP projection (their first vision_dim channels), ByT5 slots through the
        glyph mapper (first byt5_dim channels), LLM tokens through the refiner (pooled and attending over the
        LLM tokens only); each stream adds its type embedding. Padding tokens come out zero.
        """
        cfg = self.cfg
        V = cfg.vision_tokens if cfg.vision_dim else 0
        G = cfg.byt5_tokens if cfg.byt5_dim else 0
        B, L, _ = text.shape
        if L < V + G:
            raise ValueError(f"WorldDiT: packed text has {L} tokens, fewer than the {V} vision + {G} ByT5 slots "
                             f"(models/text_encoders.pack_text_streams lays them out)")
        llm, llm_mask = text[:, V + G:], None if text_mask is None else text_mask[:, V + G:]
        parts = []
        if V:
            parts.append((self.vision_embed(text[:, :V, :cfg.vision_dim]), 2))
        if G:
            parts.append((self.byt5_embed(text[:, V:V + G, :cfg.byt5_dim]), 1))
        if llm.shape[1]:
            spec = self._text_spec(llm.shape[1], llm_mask)
            parts.append((self.text_embed(llm, llm_mask, spec, cfg.attn_backend, text_sigma), 0))
        out = []
        for tokens, kind in parts:
            if cfg.cond_type_embed:
                tokens = tokens + self.cond_type.weight[kind].to(tokens.dtype)
            out.append(tokens)
        txt = torch.cat(out, dim=1)
        return txt if text_mask is None else txt * text_mask[..., None].to(txt.dtype)

    def _joint_spec(self, text_len: int, text_mask: Tensor | None, video_len: int, chunk_size: int | None) -> MaskSpec:
        """Text queries vs [text ; video] keys, all visible (text_attends_video); padding hidden by ``text_mask``."""
        if chunk_size is not None:
            raise ValueError("WorldDiT: text_attends_video=True is bidirectional only (chunk_size must be None): "
                             "text that saw later chunks would leak them into earlier ones")
        k_valid = None
        if text_mask is not None:
            k_valid = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], video_len, dtype=torch.bool)], 1)
        return MaskSpec(((text_len, 0),), ((text_len, -1), (video_len, 0)), False, k_valid, text_mask)

    def _fill_text(self, cache: KVCache | None, text: Tensor | None, text_mask: Tensor | None) -> None:
        if cache is None:
            raise ValueError("WorldDiT.fill_text_cache: no cache given")
        if text is not None and text.shape[1] and (self.cfg.text_sigma != "zero" or self.cfg.text_attends_video):
            raise ValueError("WorldDiT.fill_text_cache: this model's text stream depends on the video "
                             f"(text_sigma={self.cfg.text_sigma!r}, text_attends_video={self.cfg.text_attends_video}); "
                             "pass the text to every forward call instead (bidirectional / window sampling)")
        if text is None or text.shape[1] == 0:
            cache.clear()
            return None
        if text_mask is not None and text_mask.shape == text.shape[:2] and bool(text_mask.all()):
            # Nothing is padding (e.g. one prompt): without a mask every later call keeps the dense cuDNN
            # path instead of flex. One host sync per prompt.
            text_mask = None
        txt, spec = self._embed_text(text, text_mask)
        txt_vec = self._text_vec(text.shape[0], text.device)
        # Text-only pass: no video tokens, only the text spec is used.
        layout = FrameLayout(0, 0, None, None, text_spec=spec, backend=self.cfg.attn_backend, fuse=self.cfg.fuse)
        kvs = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            _, txt, kv = self._run(blk, None, None, txt, txt_vec, layout, None, want_vid=False, want_txt=i < last,
                                   want_kv=True)
            kvs.append(kv)
        cache.set_text(kvs, text_mask)
        return None

    # ---- cache API -----------------------------------------------------------------------------
    def fill_text_cache(self, cache: KVCache, text: Tensor | None, text_mask: Tensor | None = None) -> KVCache:
        """Compute every block's text keys/values once per prompt (text [B, L, text_dim]); clears the context."""
        self(None, None, text=text, text_mask=text_mask, cache=cache, fill="text")  # no video in a text pass
        return cache

    def fill_context_cache(
        self,
        cache: KVCache,
        *,
        x: Tensor,
        sigma: Tensor,
        actions: Tensor | None = None,
        w2c: Tensor | None = None,
        K: Tensor | None = None,
        t_pos: Tensor | None = None,
        image_latent: Tensor | None = None,
        cond_mask: Tensor | None = None,
        chunk_size: int | None = None,
        causal: bool = True,
        reuse: int = 0,
    ) -> KVCache:
        """Compute the context's per-block keys/values in one forward pass and store them after the text.

        x [B, C, Tc, H, W] context latents with their sigma [B, Tc] (and actions, cameras, positions,
        default t_pos = arange(Tc)). ``causal=True``: block-causal among context chunks of
        ``chunk_size`` latents (matches block-causal training); False: full attention inside the
        context. Replaces any previous context.

        ``reuse`` (block-causal only, a multiple of ``chunk_size``): the caller vouches that the first
        ``reuse`` latents, with their conditioning and positions, are those the cached context starts
        with. Their keys/values depend on nothing after them, so they are kept and only the rest is
        encoded, attending to them as a cached step does. The result equals a full fill.
        """
        if reuse:
            if not causal or chunk_size is None or reuse % chunk_size or not 0 < reuse <= cache.context_frames \
                    or reuse > x.shape[2]:
                raise ValueError(f"WorldDiT.fill_context_cache: reuse={reuse} needs a block-causal fill whose chunk_size "
                                 f"({chunk_size}) divides it, at most the cached {cache.context_frames} and the given "
                                 f"{x.shape[2]} context latents")
            if t_pos is None:
                t_pos = torch.arange(x.shape[2], device=x.device).expand(x.shape[0], -1)
            cache.keep_context(reuse)
            if reuse == x.shape[2]:
                return cache
            rest = slice(reuse, None)
            self(x[:, :, rest], sigma[:, rest], actions=None if actions is None else actions[:, rest],
                 w2c=None if w2c is None else w2c[:, rest], K=None if K is None else K[:, rest], t_pos=t_pos[:, rest],
                 image_latent=image_latent, cond_mask=None if cond_mask is None else cond_mask[:, rest],
                 chunk_size=chunk_size, cache=cache, fill="extend")
            return cache
        cache.clear_context()
        self(x, sigma, actions=actions, w2c=w2c, K=K, t_pos=t_pos, image_latent=image_latent, cond_mask=cond_mask,
             chunk_size=chunk_size, cache=cache, fill="context", causal=causal)
        return cache

    def num_parameters(self, branch: str = "all") -> int:
        """Parameter count: 'all', 'base' (without action/PRoPE) or 'worldplay' (action + PRoPE only)."""
        extra = 0
        if self.action_embed is not None:
            extra += sum(p.numel() for p in self.action_embed.parameters())
        for blk in self.blocks:
            if blk.prope_proj is not None:
                extra += sum(p.numel() for p in blk.prope_proj.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"all": total, "base": total - extra, "worldplay": extra}[branch]
