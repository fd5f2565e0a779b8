"""``python -m data.precompute``: encode a dataset's clips to autoencoder latents, once.

    python -m data.precompute --src outputs/data/synthetic --out outputs/data/synthetic_latents \\
        --size 64x64 --autoencoder patch --patch-size 8
    python -m data.precompute --src DIR --out DIR --size 832x480 --autoencoder hunyuan15 --ae-path /models/hv15/vae --device cuda

Each clip is framed at the training size (``data.transforms``: centre crop + resize, K follows),
trimmed to ``1 + s*k`` frames for the autoencoder's temporal stride ``s``, encoded, and written
back in the clip contract with a ``latents`` entry and ``meta["latents"]`` recording the
autoencoder. The training loader then cuts windows from the latents (train/latent_windows.py)
instead of encoding video every step — what a pretrained video VAE needs at scale.

This is the one module of ``data/`` that reaches into ``models/`` (for the autoencoder); it is a
command-line entry point, imported by nothing, so the package layering holds for library code.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from data.indexed import ShardDataset
from data.shards import ShardWriter
from data.transforms import crop_resize, parse_wxh


def main(argv: list[str] | None = None) -> int:
    from models.autoencoders import AutoencoderConfig, build_autoencoder  # the entry point's one models import

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="dataset directory (index.json + shards)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--size", required=True, help="training frame size WxH (latents are fixed to it)")
    p.add_argument("--autoencoder", default="patch", choices=["patch", "hunyuan15", "wan"])
    p.add_argument("--ae-path", default=None, help="local directory of a pretrained VAE (hunyuan15 / wan)")
    p.add_argument("--patch-size", type=int, default=8, help="patch autoencoder: spatial patch")
    p.add_argument("--temporal-patch", type=int, default=1, help="patch autoencoder: frames per latent after the first")
    p.add_argument("--dtype", default="float32", help="autoencoder dtype (float32 | bfloat16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        width, height = parse_wxh(a.size)
    except ValueError as e:
        raise SystemExit(f"data.precompute: {e}") from None
    ae_cfg = AutoencoderConfig(kind=a.autoencoder, path=a.ae_path, patch_size=a.patch_size, temporal_patch=a.temporal_patch, dtype=a.dtype)
    ae = build_autoencoder(ae_cfg).to(a.device).eval()
    stride = ae.temporal_stride
    info = {"config": asdict(ae_cfg), "temporal_stride": stride, "spatial_stride": ae.spatial_stride, "channels": ae.latent_channels}
    clips = ShardDataset(a.src)
    t0, frames = time.time(), 0
    with ShardWriter(a.out, video_format="lossless", overwrite=a.overwrite) as w:
        for i in range(len(clips)):
            clip = clips[i]
            F = 1 + stride * ((clip["video"].shape[0] - 1) // stride)
            video, K = crop_resize(np.asarray(clip["video"][:F]), np.asarray(clip["K"][:F]), height, width)
            x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0).to(a.device)
            with torch.no_grad():
                lat = ae.encode(x)[0].float().cpu().numpy()
            meta = {**clip["meta"], "latents": info, "precomputed_from": str(clip.get("__shard__", a.src)) + ":" + str(clip.get("__key__", i))}
            w.write({"video": video, "c2w": np.asarray(clip["c2w"][:F]), "K": K.float().numpy(), "keys": np.asarray(clip["keys"][:F]), "caption": clip["caption"], "meta": meta, "latents": lat})
            frames += F
    print(f"precompute: {len(clips)} clips ({frames} frames) -> latents {info['channels']}x(T)x{height // ae.spatial_stride}x{width // ae.spatial_stride} "
          f"with {a.autoencoder} in {time.time() - t0:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
