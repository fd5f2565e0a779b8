"""Autoencoders behind one interface (``Autoencoder``) and a registry-style factory.

Adding a VAE is one entry in ``AUTOENCODERS``: a function from ``AutoencoderConfig`` to an
``Autoencoder``.
"""

from __future__ import annotations

from typing import Callable

from models.autoencoders.base import Autoencoder, AutoencoderConfig, StreamDecoder
from models.autoencoders.diffusers_vae import (
    DiffusersVideoVAE,
    HunyuanVideo15VAE,
    WanVAE,
    load_hunyuan15,
    load_wan,
)
from models.autoencoders.patch import PatchAutoencoder

AUTOENCODERS: dict[str, Callable[[AutoencoderConfig], Autoencoder]] = {
    "patch": PatchAutoencoder.from_config,
    "hunyuan15": load_hunyuan15,
    "wan": load_wan,
}


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """The autoencoder ``cfg.kind`` names, built from ``cfg``."""
    try:
        factory = AUTOENCODERS[cfg.kind]
    except KeyError:
        raise ValueError(f"autoencoder.kind: unknown autoencoder {cfg.kind!r}; known: {sorted(AUTOENCODERS)}") from None
    return factory(cfg)


__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "AutoencoderConfig",
    "DiffusersVideoVAE",
    "HunyuanVideo15VAE",
    "PatchAutoencoder",
    "StreamDecoder",
    "WanVAE",
    "build_autoencoder",
]
