"""Streaming (chunk-by-chunk) decoders of diffusers' causal video VAEs, equal to a whole-video decode.

Both decoders are causal in time, so a chunk of new latents can be decoded alone given, per
layer that looks back in time, what it saw of the previous chunks. The diffusers modules and
their weights are used as they are; this file only carries that per-layer state.

HunyuanVideo-1.5 (``AutoencoderKLHunyuanVideo15``), every layer of its decoder that mixes time:

- ``HunyuanVideo15CausalConv3d`` pads ``kt - 1`` frames in front of its input (copies of frame 0,
  ``pad_mode="replicate"``; space is replicate-padded too) and runs a stride-1 ``Conv3d``. Streamed,
  the input is padded the same way, then the front frames are overwritten with the last ``kt - 1``
  padded input frames of the previous chunk (cached per conv; the first chunk keeps frame 0's copies).
- ``HunyuanVideo15Upsample`` with temporal upsampling turns the video's first frame into 1 frame
  (half its channels) and every later frame into 2. Streamed, only the first chunk holds that
  frame; later chunks take the two-frame rule for all their frames.
- ``HunyuanVideo15AttnBlock`` (mid block, latent rate) is one-head attention over every token of
  every frame with a frame-causal mask: a frame attends to itself and to all earlier frames. It is
  not a fixed window, so the stream keeps the keys and values of every earlier latent frame (a KV
  cache of ``2 * C_mid * h * w`` values per latent: 12.8 MB fp32 per latent at 480x832, and the
  attention cost grows with the video). ``attention_history=N`` keeps only the last N latents
  (bounded memory; no longer equal to the whole-video decode once a video is longer than N + 1
  latents). HY-WorldPlay's own "w_cache" decoder attends within the current chunk only, i.e. N = 0.
- Everything else is per frame (RMS norm over channels, 1x1x1 convs, SiLU, channel repeats).

The stream drives these layers from outside: for the duration of one call, each of them gets an
instance-level ``forward`` that reads and writes this stream's caches, then diffusers' own
``Decoder3D.forward`` runs; the overrides are removed afterwards. A module-wide lock keeps a
whole-video decode (which takes it too) from running while they are installed.

Wan (``AutoencoderKLWan``): diffusers' decoder already threads a ``feat_cache`` list through every
causal conv and temporal upsampler (it decodes one latent at a time, the first with
``first_chunk=True``). The stream keeps that list between calls. Latent 0 must go alone (the
temporal upsamplers mark their cache "Rep" on it and skip their time conv); later latents of a
call go through the decoder together (zero-padded causal convs: the same arithmetic, rounding
aside), or one by one with ``per_latent=True``, which repeats diffusers' loop operation for
operation. Wan's mid-block attention is per frame (spatial only).

Spatial tiling (``vae.enable_tiling()``) is not used by the streams: they decode whole frames,
which is what an untiled whole-video decode gives. Use them for inference (no gradients): the
caches would otherwise hold autograd graphs across chunks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoencoders.base import StreamDecoder

# Held while a HunyuanVideo-1.5 stream has its forward overrides installed, and by every whole-video
# decode of a diffusers VAE, so that the two never interleave on one module.
DRIVE_LOCK = threading.RLock()


class HunyuanVideo15StreamDecoder(StreamDecoder):
    """Chunk-by-chunk decoding of a ``HunyuanVideo15VAE``; see the module docstring for what is cached.

    attention_history: latents of the past the mid-block attention sees (None: all of them, which
        equals the whole-video decode; N: the last N, bounded memory and time, approximate).
    """

    def __init__(self, autoencoder: Any, attention_history: Optional[int] = None):
        super().__init__(autoencoder)
        from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
            HunyuanVideo15AttnBlock,
            HunyuanVideo15CausalConv3d,
            HunyuanVideo15Upsample,
        )

        if attention_history is not None and attention_history < 0:
            raise ValueError(f"hunyuan15 stream decoder: attention_history must be >= 0 or None, got {attention_history}")
        self.attention_history = attention_history
        decoder = autoencoder.vae.decoder
        self._convs = [m for m in decoder.modules() if isinstance(m, HunyuanVideo15CausalConv3d)]
        self._upsamplers = [m for m in decoder.modules() if isinstance(m, HunyuanVideo15Upsample) and m.add_temporal_upsample]
        self._attentions = [m for m in decoder.modules() if isinstance(m, HunyuanVideo15AttnBlock)]
        self._check_layers(decoder)
        self._first = True
        self._conv_cache: list[Optional[Tensor]] = []
        self._kv_cache: list[Optional[tuple[Tensor, Tensor]]] = []
        self._reset()

    def _check_layers(self, decoder: nn.Module) -> None:
        """Refuse a decoder with a time-mixing layer this stream does not know how to carry."""
        wrapped = {id(c.conv) for c in self._convs}
        for name, m in decoder.named_modules():
            if isinstance(m, nn.Conv3d) and id(m) not in wrapped and (m.kernel_size[0] != 1 or m.stride[0] != 1):
                raise NotImplementedError(f"hunyuan15 stream decoder: {name} is a temporal conv outside a causal conv")
        for c in self._convs:
            conv = c.conv
            if conv.stride[0] != 1 or conv.dilation[0] != 1 or c.time_causal_padding[5] != 0:
                raise NotImplementedError(
                    f"hunyuan15 stream decoder: causal conv with temporal stride {conv.stride[0]}, dilation "
                    f"{conv.dilation[0]}, padding {c.time_causal_padding} is not supported"
                )
            if c.time_causal_padding[4] > 0 and c.pad_mode not in ("replicate", "constant"):
                raise NotImplementedError(f"hunyuan15 stream decoder: causal conv pad_mode {c.pad_mode!r}")

    def _reset(self) -> None:
        self._first = True
        self._conv_cache = [None] * len(self._convs)
        self._kv_cache = [None] * len(self._attentions)

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        ae = self.autoencoder
        raw = ae._raw(latents)
        with DRIVE_LOCK, self._driving(first):
            video = ae.vae.decoder(raw)
        self._first = False
        return video.clamp(-1.0, 1.0)

    @contextlib.contextmanager
    def _driving(self, first: bool) -> Iterator[None]:
        """Install this stream's forwards on the decoder's time-mixing layers for one call."""
        self._first = first
        patched: list[nn.Module] = []
        try:
            for i, conv in enumerate(self._convs):
                conv.forward = functools.partial(self._conv_forward, i, conv)
                patched.append(conv)
            for up in self._upsamplers:
                up.forward = functools.partial(self._upsample_forward, up)
                patched.append(up)
            for i, attn in enumerate(self._attentions):
                attn.forward = functools.partial(self._attention_forward, i, attn)
                patched.append(attn)
            yield
        finally:
            for m in patched:
                del m.forward  # back to the class's forward

    def _conv_forward(self, i: int, conv: nn.Module, x: Tensor) -> Tensor:
        """Causal conv of chunk x [B, C, T, H, W] with the previous chunk's last kt - 1 input frames in front."""
        pad = conv.time_causal_padding  # (w, w, h, h, kt - 1, 0) in F.pad's order
        front = pad[4]
        # diffusers' own padding: its front frames are what a video start gets (copies of frame 0) ...
        xt = F.pad(x, pad, mode=conv.pad_mode)
        if front == 0:
            return conv.conv(xt)
        prev = self._conv_cache[i]
        if prev is not None:  # ... later chunks put the previous chunk's last (padded) input frames there
            xt[:, :, :front] = prev
        self._conv_cache[i] = xt[:, :, -front:].clone()  # clone: do not keep the whole chunk alive
        return conv.conv(xt)

    def _upsample_forward(self, up: nn.Module, x: Tensor) -> Tensor:
        """Temporal upsampler: diffusers' rule on the first chunk (frame 0 -> 1 frame), two frames per frame after."""
        if self._first:
            return type(up).forward(up, x)  # its conv call still goes through the cached forward
        h = up._dcae_upsample_rearrange(up.conv(x), r1=2, r2=2, r3=2)
        shortcut = up._dcae_upsample_rearrange(x, r1=2, r2=2, r3=2).repeat_interleave(repeats=up.repeats, dim=1)
        return h + shortcut

    def _attention_forward(self, i: int, attn: nn.Module, x: Tensor) -> Tensor:
        """Frame-causal attention of chunk x [B, C, T, h, w] over the cached keys/values of earlier frames."""
        B, C, T, H, W = x.shape
        y = attn.norm(x)

        def tokens(proj: nn.Module) -> Tensor:  # [B, C, T, h, w] -> [B, T, h*w, C]
            return proj(y).flatten(3).permute(0, 2, 3, 1)

        q, k, v = tokens(attn.to_q), tokens(attn.to_k), tokens(attn.to_v)
        past = self._kv_cache[i]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        n_past = k.shape[1] - T
        out = []
        for j in range(T):  # frame j sees the past and frames <= j of this chunk: no mask needed
            end = n_past + j + 1
            start = 0 if self.attention_history is None else max(0, end - 1 - self.attention_history)
            kj = k[:, start:end].reshape(B, 1, -1, C)
            vj = v[:, start:end].reshape(B, 1, -1, C)
            out.append(F.scaled_dot_product_attention(q[:, j].unsqueeze(1), kj, vj).squeeze(1))
        keep = k.shape[1] if self.attention_history is None else min(k.shape[1], self.attention_history)
        self._kv_cache[i] = (k[:, k.shape[1] - keep :], v[:, v.shape[1] - keep :]) if keep else None
        o = torch.stack(out, dim=1).reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return attn.proj_out(o) + x


class WanStreamDecoder(StreamDecoder):
    """Chunk-by-chunk decoding of a ``WanVAE``, keeping diffusers' ``feat_cache`` between calls.

    per_latent: run the decoder one latent at a time, exactly as ``AutoencoderKLWan.decode`` does
        (bit-equal); otherwise latents after the first go through it together (equal up to rounding,
        faster on a GPU).
    """

    def __init__(self, autoencoder: Any, per_latent: bool = False):
        super().__init__(autoencoder)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.per_latent = per_latent
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in autoencoder.vae.decoder.modules())
        self._feat_cache: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._feat_cache = [None] * self._num_convs

    def _decoder(self, x: Tensor, first_chunk: bool) -> Tensor:
        # feat_idx counts the convs of one decoder call; diffusers' default list would be shared state
        return self.autoencoder.vae.decoder(x, feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first_chunk)

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.autoencoder.vae
        x = vae.post_quant_conv(self.autoencoder._raw(latents))  # 1x1x1: per frame
        parts = []
        if first:  # latent 0 alone: the "first chunk" of diffusers' loop
            parts.append(self._decoder(x[:, :, :1], first_chunk=True))
            x = x[:, :, 1:]
        if x.shape[2]:
            steps = x.split(1, dim=2) if self.per_latent else [x]
            parts += [self._decoder(step, first_chunk=False) for step in steps]
        out = torch.cat(parts, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)
