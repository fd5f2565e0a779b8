"""Parameter-free patch autoencoder: pixel-space latents by space-to-depth, with an exact round trip.

Each latent pixel holds a p x p patch of every frame in its temporal group, so
``C = 3 * s * p * p`` with channels ordered (rgb, frame-in-group, patch row, patch column).
Causal grouping: latent 0 covers frame 0 alone, so frame 0 is replicated ``s`` times to fill a
full group and latent 0 has the same channel count as the others; decoding averages those
replicas (exact for encoded video, and the least-squares frame 0 for a generated latent).
An optional fixed per-channel normalisation ``(z - mean) / std`` brings latents to ~unit variance.
Used by the embedded default model and by every CPU test.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from einops import rearrange
from torch import Tensor

from models.autoencoders.base import Autoencoder, AutoencoderConfig, StreamDecoder


class PatchAutoencoder(Autoencoder):
    """Space-to-depth autoencoder with spatial patch ``patch_size`` and temporal group ``temporal_patch``."""

    name = "patch"

    def __init__(
        self,
        patch_size: int = 8,
        temporal_patch: int = 1,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if patch_size < 1 or temporal_patch < 1:
            raise ValueError(
                f"patch autoencoder: patch_size and temporal_patch must be >= 1, got {patch_size}, {temporal_patch}"
            )
        self.p, self.s = int(patch_size), int(temporal_patch)
        C = self.latent_channels
        self.register_buffer("mean", self._channel_stats(mean, 0.0, "mean"), persistent=False)
        self.register_buffer("std", self._channel_stats(std, 1.0, "std"), persistent=False)
        if (self.std <= 0).any():
            raise ValueError(f"patch autoencoder: std must be positive, got {std}")
        assert self.mean.shape == (C,)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> "PatchAutoencoder":
        return cls(cfg.patch_size, cfg.temporal_patch, cfg.mean, cfg.std)

    def _channel_stats(self, values: Optional[Sequence[float]], default: float, what: str) -> Tensor:
        """Per-latent-channel [C] statistics from None, 3 RGB values or C values."""
        C = self.latent_channels
        if values is None:
            return torch.full((C,), default)
        v = torch.as_tensor(list(values), dtype=torch.float32)
        if v.ndim != 1 or v.numel() not in (3, C):
            raise ValueError(
                f"patch autoencoder: {what} needs 3 values (per RGB channel) or {C} (per latent channel), "
                f"got shape {list(v.shape)}"
            )
        # Channels are ordered (rgb, frame, row, col), so RGB statistics repeat in contiguous blocks.
        return v.repeat_interleave(C // 3) if v.numel() == 3 else v

    @property
    def spatial_stride(self) -> int:
        return self.p

    @property
    def temporal_stride(self) -> int:
        return self.s

    @property
    def latent_channels(self) -> int:
        return 3 * self.s * self.p * self.p

    @property
    def scaling_factor(self) -> float:
        return 1.0

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.mean.to(z).view(shape), self.std.to(z).view(shape)

    def _encode(self, video: Tensor) -> Tensor:
        first = video[:, :, :1].expand(-1, -1, self.s, -1, -1)
        grouped = torch.cat([first, video[:, :, 1:]], dim=2)  # [B, 3, s*T, H, W]
        z = rearrange(grouped, "b c (t st) (h ph) (w pw) -> b (c st ph pw) t h w", st=self.s, ph=self.p, pw=self.p)
        mean, std = self._stats(z)
        return (z - mean) / std

    def _frames(self, latents: Tensor) -> Tensor:
        """Every group's frames [B, 3, s*T, H, W] of latents [B, C, T, h, w] (latent 0's replicas not merged)."""
        mean, std = self._stats(latents)
        z = latents * std + mean
        return rearrange(z, "b (c st ph pw) t h w -> b c (t st) (h ph) (w pw)", st=self.s, ph=self.p, pw=self.p)

    def _decode(self, latents: Tensor) -> Tensor:
        frames = self._frames(latents)
        first = frames[:, :, : self.s].mean(dim=2, keepdim=True)
        return torch.cat([first, frames[:, :, self.s :]], dim=2)

    def stream_decoder(self) -> "PatchStreamDecoder":
        return PatchStreamDecoder(self)


class PatchStreamDecoder(StreamDecoder):
    """Streaming decode of the patch autoencoder: per latent, so no state beyond "is this the first chunk"."""

    autoencoder: PatchAutoencoder

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        ae = self.autoencoder
        return ae._decode(latents) if first else ae._frames(latents)
