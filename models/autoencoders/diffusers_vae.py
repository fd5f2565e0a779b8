"""Pretrained causal video VAEs through diffusers, loaded from a local directory.

- HunyuanVideo-1.5 (``AutoencoderKLHunyuanVideo15``): 16x spatial, 4x temporal, 32 channels;
  latents are ``mode * scaling_factor`` (1.03682, read from the VAE config).
- Wan 2.1/2.2 (``AutoencoderKLWan``): 8x (2.1) or 16x (2.2) spatial, 4x temporal, 16/48 channels;
  latents are ``(mode - latents_mean) / latents_std`` per channel (from the VAE config).

Both encode frame 0 alone and then groups of 4 frames, the rule of ``data.latents``. diffusers is
imported lazily: it takes seconds to import and the patch autoencoder never needs it.
``stream_decoder()`` decodes chunk by chunk with per-layer caches (``models.autoencoders.stream``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from models.autoencoders.base import Autoencoder, AutoencoderConfig, parse_dtype
from models.autoencoders.stream import DRIVE_LOCK, HunyuanVideo15StreamDecoder, WanStreamDecoder


class DiffusersVideoVAE(Autoencoder):
    """A diffusers ``AutoencoderKL*`` video VAE with its latent normalisation.

    Latents are ``(raw - mean) / std * scaling`` with per-channel ``mean``/``std`` (zeros/ones
    when the VAE has none) and a scalar ``scaling``.
    """

    name = "diffusers"

    def __init__(
        self,
        vae: nn.Module,
        *,
        spatial_stride: int,
        temporal_stride: int,
        latent_channels: int,
        scaling_factor: float = 1.0,
        latents_mean: Optional[Sequence[float]] = None,
        latents_std: Optional[Sequence[float]] = None,
        sample_posterior: bool = False,
    ):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self._spatial, self._temporal, self._channels = int(spatial_stride), int(temporal_stride), int(latent_channels)
        self._scaling = float(scaling_factor)
        self.sample_posterior = sample_posterior
        C = self._channels
        mean = torch.zeros(C) if latents_mean is None else torch.as_tensor(list(latents_mean), dtype=torch.float32)
        std = torch.ones(C) if latents_std is None else torch.as_tensor(list(latents_std), dtype=torch.float32)
        if mean.shape != (C,) or std.shape != (C,):
            raise ValueError(
                f"{self.name} VAE: latents_mean/std need {C} values, got {list(mean.shape)} and {list(std.shape)}"
            )
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @property
    def spatial_stride(self) -> int:
        return self._spatial

    @property
    def temporal_stride(self) -> int:
        return self._temporal

    @property
    def latent_channels(self) -> int:
        return self._channels

    @property
    def scaling_factor(self) -> float:
        return self._scaling

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.latents_mean.to(z).view(shape), self.latents_std.to(z).view(shape)

    def _encode(self, video: Tensor) -> Tensor:
        posterior = self.vae.encode(video.to(self.dtype)).latent_dist
        raw = (posterior.sample() if self.sample_posterior else posterior.mode()).float()
        mean, std = self._stats(raw)
        return (raw - mean) / std * self._scaling

    def _raw(self, latents: Tensor) -> Tensor:
        """The VAE's own latents (normalisation undone), in its dtype, from normalised latents [B, C, T, h, w]."""
        mean, std = self._stats(latents.float())
        return (latents.float() / self._scaling * std + mean).to(self.dtype)

    def _decode(self, latents: Tensor) -> Tensor:
        with DRIVE_LOCK:  # never while a stream decoder has its layer overrides installed
            return self.vae.decode(self._raw(latents)).sample.clamp(-1.0, 1.0)


class HunyuanVideo15VAE(DiffusersVideoVAE):
    """HunyuanVideo-1.5's causal VAE (``AutoencoderKLHunyuanVideo15``); strides read from its config."""

    name = "hunyuan15"
    diffusers_class = "AutoencoderKLHunyuanVideo15"

    def __init__(self, vae: nn.Module, sample_posterior: bool = False):
        c = vae.config
        super().__init__(
            vae,
            spatial_stride=c.spatial_compression_ratio,
            temporal_stride=c.temporal_compression_ratio,
            latent_channels=c.latent_channels,
            scaling_factor=c.scaling_factor,
            sample_posterior=sample_posterior,
        )

    def stream_decoder(self, attention_history: Optional[int] = None) -> HunyuanVideo15StreamDecoder:
        """Streaming decoder; ``attention_history`` bounds the mid-block attention's past (None: exact)."""
        return HunyuanVideo15StreamDecoder(self, attention_history=attention_history)


class WanVAE(DiffusersVideoVAE):
    """Wan's causal VAE (``AutoencoderKLWan``) with its per-channel latent mean/std."""

    name = "wan"
    diffusers_class = "AutoencoderKLWan"

    def __init__(self, vae: nn.Module, sample_posterior: bool = False):
        c = vae.config
        # diffusers' Wan encoder walks frames in groups of exactly 4 whatever the config says.
        if c.scale_factor_temporal != 4:
            raise ValueError(f"wan VAE: scale_factor_temporal must be 4, got {c.scale_factor_temporal}")
        super().__init__(
            vae,
            spatial_stride=c.scale_factor_spatial,
            temporal_stride=c.scale_factor_temporal,
            latent_channels=c.z_dim,
            latents_mean=c.latents_mean,
            latents_std=c.latents_std,
            sample_posterior=sample_posterior,
        )

    def stream_decoder(self, per_latent: bool = False) -> WanStreamDecoder:
        """Streaming decoder; ``per_latent`` repeats diffusers' one-latent-at-a-time loop exactly."""
        return WanStreamDecoder(self, per_latent=per_latent)


def _vae_location(path: Optional[str], kind: str) -> tuple[str, Optional[str]]:
    """(directory, subfolder) of a VAE: ``path`` itself, or ``path/vae`` of a pipeline root."""
    if not path:
        raise ValueError(f"autoencoder '{kind}': config.path must name a local VAE directory")
    root = Path(path).expanduser()
    if (root / "config.json").is_file():
        return str(root), None
    if (root / "vae" / "config.json").is_file():
        return str(root), "vae"
    raise FileNotFoundError(f"autoencoder '{kind}': no config.json in {root} or {root / 'vae'}")


def _load(cls: type[DiffusersVideoVAE], cfg: AutoencoderConfig) -> DiffusersVideoVAE:
    import diffusers

    dtype = parse_dtype(cfg.dtype, f"autoencoder '{cls.name}'.dtype")
    directory, subfolder = _vae_location(cfg.path, cls.name)
    vae = getattr(diffusers, cls.diffusers_class).from_pretrained(
        directory, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
    )
    if cfg.tiling:
        vae.enable_tiling()
    return cls(vae, sample_posterior=cfg.sample_posterior)


def load_hunyuan15(cfg: AutoencoderConfig) -> HunyuanVideo15VAE:
    """HunyuanVideo-1.5 VAE from ``cfg.path`` in ``cfg.dtype``, tiled if ``cfg.tiling``."""
    return _load(HunyuanVideo15VAE, cfg)


def load_wan(cfg: AutoencoderConfig) -> WanVAE:
    """Wan VAE from ``cfg.path`` in ``cfg.dtype``, tiled if ``cfg.tiling``."""
    return _load(WanVAE, cfg)
