"""The autoencoder interface every stage codes against, and its config schema.

Video is float in [-1, 1] shaped [B, 3, F, H, W]; latents are [B, C, T, h, w] and are already
normalised (scaled / shifted) so that they have roughly unit variance, which is what flow matching
assumes when it mixes them with unit Gaussian noise. Frames group causally: frame 0 alone, then
groups of ``temporal_stride`` frames, so ``F = 1 + s * (T - 1)`` (the rule lives in
``data.latents``). Outputs are float32 whatever the dtype the network runs in.

Streaming: ``Autoencoder.stream_decoder()`` returns a :class:`StreamDecoder` that decodes a latent
video chunk by chunk (each call gets only the new latents) and returns the frames that decoding
the whole video at once gives for them, within float rounding. Causal VAEs keep per-layer caches
of the previous calls; the patch autoencoder needs only to know whether a chunk is the first.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from data.latents import num_frames as _num_frames
from data.latents import num_latents as _num_latents

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str, where: str) -> torch.dtype:
    """Torch dtype for a config string such as ``"bf16"``; ``where`` names the config field."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{where}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


@dataclass
class AutoencoderConfig:
    """Which autoencoder to build and how (Hydra group ``autoencoder``).

    kind: a key of ``models.autoencoders.AUTOENCODERS`` ("patch", "hunyuan15", "wan").
    patch_size / temporal_patch: spatial patch p and temporal group s of the patch autoencoder.
    mean / std: optional fixed per-channel normalisation of the patch autoencoder: 3 values (one per
        RGB channel, shared by every patch position) or one per latent channel.
    path: local directory of a pretrained VAE (its ``config.json``, or a pipeline root with ``vae/``).
    dtype: the dtype the VAE runs in. tiling: spatial tiling for large frames (pretrained VAEs).
    sample_posterior: encode to a posterior sample instead of its mean (pretrained VAEs).
    """

    kind: str = "patch"
    patch_size: int = 8
    temporal_patch: int = 1
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    path: Optional[str] = None
    dtype: str = "float32"
    tiling: bool = False
    sample_posterior: bool = False


class Autoencoder(nn.Module, abc.ABC):
    """Video <-> latent mapping with causal temporal grouping; see the module docstring."""

    name: str = "autoencoder"

    @property
    @abc.abstractmethod
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along H and W."""

    @property
    @abc.abstractmethod
    def temporal_stride(self) -> int:
        """Frames per latent frame after the first (which covers frame 0 alone)."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channel count C of the latents."""

    @property
    @abc.abstractmethod
    def scaling_factor(self) -> float:
        """Scalar multiplied into the raw latents (1.0 where a per-channel normalisation does the job)."""

    @abc.abstractmethod
    def _encode(self, video: Tensor) -> Tensor:
        """Encode a checked video [B, 3, F, H, W] into normalised latents [B, C, T, h, w]."""

    @abc.abstractmethod
    def _decode(self, latents: Tensor) -> Tensor:
        """Decode checked normalised latents [B, C, T, h, w] into video [B, 3, F, H, W]."""

    def num_latents(self, num_frames: int) -> int:
        """Latent count T for ``num_frames`` frames; raises if they do not fill whole groups."""
        try:
            return _num_latents(num_frames, self.temporal_stride)
        except ValueError as e:
            raise ValueError(f"{self.name} autoencoder: {e}") from None

    def num_frames(self, num_latents: int) -> int:
        """Frame count F decoded from ``num_latents`` latents."""
        if num_latents < 1:
            raise ValueError(f"{self.name} autoencoder: need at least 1 latent, got {num_latents}")
        return _num_frames(num_latents, self.temporal_stride)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a ``num_frames`` x ``height`` x ``width`` video."""
        s = self.spatial_stride
        if height % s or width % s:
            raise ValueError(
                f"{self.name} autoencoder: frame size {height}x{width} is not divisible by its spatial stride {s}"
            )
        return self.latent_channels, self.num_latents(num_frames), height // s, width // s

    def encode(self, video: Tensor) -> Tensor:
        """Normalised latents [B, C, T, h, w] (float32) from video [B, 3, F, H, W] in [-1, 1]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"{self.name} autoencoder: encode expects video [B, 3, F, H, W], got {list(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"{self.name} autoencoder: encode expects float video in [-1, 1], got {video.dtype}")
        C, T, h, w = self.latent_shape(*video.shape[2:])
        z = self._encode(video)
        assert z.shape[1:] == (C, T, h, w), f"{self.name} produced {list(z.shape)}, expected [B, {C}, {T}, {h}, {w}]"
        return z.float()

    def decode(self, latents: Tensor) -> Tensor:
        """Video [B, 3, F, H, W] (float32, about [-1, 1]) from normalised latents [B, C, T, h, w]."""
        self._check_latents(latents, "decode")
        T, h, w = latents.shape[2:]
        F = self.num_frames(T)
        x = self._decode(latents)
        expected = (3, F, h * self.spatial_stride, w * self.spatial_stride)
        assert x.shape[1:] == expected, f"{self.name} decoded {list(x.shape)}, expected [B, *{list(expected)}]"
        return x.float()

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh :class:`StreamDecoder` of this autoencoder (chunk-by-chunk decoding with carried state)."""
        raise NotImplementedError(f"{self.name} autoencoder: no streaming decoder; decode overlapping windows instead")

    def _check_latents(self, latents: Tensor, what: str) -> None:
        """Raise unless ``latents`` is [B, latent_channels, T >= 1, h, w]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ValueError(
                f"{self.name} autoencoder: {what} expects latents [B, {self.latent_channels}, T, h, w] (T >= 1), "
                f"got {list(latents.shape)}"
            )


class StreamDecoder(abc.ABC):
    """Decodes a latent video chunk by chunk: ``decode(new latents) -> new frames``; ``reset()`` starts a new video.

    After ``reset`` (or construction) the first chunk of L latents gives ``1 + s * (L - 1)`` frames
    (latent 0 decodes to frame 0 alone) and every later chunk ``s * L`` frames, s the temporal
    stride; concatenated, they equal ``autoencoder.decode`` of all latents at once within float
    rounding. The batch size and latent size (h, w) are fixed by the first chunk. State (caches)
    lives on the device of the latents; one stream serves one video at a time.
    """

    def __init__(self, autoencoder: Autoencoder):
        self.autoencoder = autoencoder
        self.num_latents = 0  # latents decoded since reset
        self._shape: Optional[tuple[int, int, int]] = None  # (B, h, w) of this stream

    @property
    def num_frames(self) -> int:
        """Frames returned since reset."""
        return 0 if self.num_latents == 0 else self.autoencoder.num_frames(self.num_latents)

    def decode(self, latents: Tensor) -> Tensor:
        """Frames [B, 3, F_new, H, W] (float32, about [-1, 1]) of the next latents [B, C, L, h, w] of the video."""
        ae = self.autoencoder
        ae._check_latents(latents, "stream decode")
        B, _, L, h, w = latents.shape
        if self._shape is not None and (B, h, w) != self._shape:
            raise ValueError(
                f"{ae.name} autoencoder: stream decode continues a video of latents [{self._shape[0]}, C, T, "
                f"{self._shape[1]}, {self._shape[2]}], got {list(latents.shape)}; call reset() to start another"
            )
        first = self.num_latents == 0
        x = self._decode_chunk(latents, first)
        s = ae.temporal_stride
        expected = (B, 3, 1 + s * (L - 1) if first else s * L, h * ae.spatial_stride, w * ae.spatial_stride)
        assert tuple(x.shape) == expected, f"{ae.name} stream decoded {list(x.shape)}, expected {list(expected)}"
        self._shape = (B, h, w)
        self.num_latents += L
        return x.float()

    def reset(self) -> None:
        """Forget the video decoded so far (caches included); the next chunk starts a new one."""
        self.num_latents = 0
        self._shape = None
        self._reset()

    @abc.abstractmethod
    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        """Frames [B, 3, F_new, H, W] of checked latents [B, C, L, h, w]; ``first``: the video's first chunk."""

    def _reset(self) -> None:
        """Drop carried state (override when there is any)."""
