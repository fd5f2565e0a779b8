"""Inference speed of ``WorldPlayer``: per-chunk latency of a random bundle at a 480p-like size.

Builds a bundle with random weights (a WorldDiT preset, an autoencoder, 256 precomputed text
tokens), loads it with ``WorldPlayer.from_bundle`` and streams chunks through ``player.step`` —
the exact code path of ``python -m infer`` — after a warm-up session. Every time is taken with
device synchronisation (``infer.timing``). Default layout: latents of 30x52 tokens (480x832 with a
16x VAE), chunks of 4 latents, a 20-latent reconstituted context (12 recent + anchor chunk + 1
retrieved chunk), the 4-step distilled schedule without CFG (WorldPlay's real-time setting).

    python -m benchmarks.infer_speed                                  # base preset, GPU, bf16, HV-1.5 VAE
    python -m benchmarks.infer_speed --preset hy15 --offload          # the 8.5B shape
    python -m benchmarks.infer_speed --schedule euler --steps 50 --guidance 6   # the undistilled AR model
    python -m benchmarks.infer_speed --preset tiny                    # CPU smoke check (small latents, patch AE)

Autoencoders: ``hunyuan15`` is diffusers' AutoencoderKLHunyuanVideo15 at its default (released)
configuration with random weights (needs diffusers), so decode time is real; ``patch`` is the
parameter-free patch autoencoder (16x16x4 patches at 480p: 3072 latent channels, decode ~free),
which isolates the DiT. Reported: load, reset (image + prompt encoding), time to first chunk,
per-chunk latency (all chunks, and the steady state once the context is full) split into model
(memory selection + context cache fill + denoising) and decode, generated frames/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from infer.player import WorldPlayer
from infer.timing import summarize
from models.autoencoders import AutoencoderConfig
from models.bundle import save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.memory import MemoryConfig
from models.rollout import RolloutConfig
from models.text_encoders import TextEncoderConfig, save_precomputed

PROMPT = "a walk through a quiet town"
MOVES = ["w", "w+right", "w", "w+left", "a", "d", "s+right", "w+up", "w+down", "right"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=["tiny", "small", "base", "hy15"])
    p.add_argument("--autoencoder", default=None, choices=["patch", "hunyuan15"],
                   help="default: hunyuan15 when diffusers is importable and the preset is not tiny, else patch")
    p.add_argument("--latent-height", type=int, default=None, help="tokens per latent row (default 30; tiny: 6)")
    p.add_argument("--latent-width", type=int, default=None, help="default 52; tiny: 10")
    p.add_argument("--chunk", type=int, default=4, help="latents per chunk")
    p.add_argument("--context", type=int, default=20, help="max context latents (recent + anchor + retrieved)")
    p.add_argument("--chunks", type=int, default=10, help="chunks in the timed session")
    p.add_argument("--warmup-chunks", type=int, default=2, help="chunks of an untimed session first")
    p.add_argument("--schedule", default="distilled", choices=["distilled", "euler"])
    p.add_argument("--steps", type=int, default=4, help="euler steps (distilled always takes 4)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--decode-overlap", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--offload", action="store_true", help="text encoder and autoencoder on CPU between uses")
    p.add_argument("--bundle-dir", default=None, help="keep the random bundle here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def _autoencoder(kind: str, directory: Path, hw: tuple[int, int], dtype: str) -> tuple[AutoencoderConfig, int, int]:
    """(config, latent channels, spatial stride) of the benchmark's autoencoder, written into ``directory``."""
    ae_dtype = "bfloat16" if dtype == "bf16" else "float32"
    if kind == "hunyuan15":
        from diffusers import AutoencoderKLHunyuanVideo15

        torch.manual_seed(0)
        vae = AutoencoderKLHunyuanVideo15()  # the released configuration, random weights
        vae.save_pretrained(str(directory / "vae"))
        c = vae.config
        return AutoencoderConfig(kind="hunyuan15", path=str((directory / "vae").resolve()), dtype=ae_dtype), c.latent_channels, c.spatial_compression_ratio
    p = 16 if min(hw) >= 16 else 4
    return AutoencoderConfig(kind="patch", patch_size=p, temporal_patch=4), 3 * 4 * p * p, p


def build_bundle(a: argparse.Namespace, directory: Path) -> Path:
    """A random bundle of ``a.preset`` at the requested latent size; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    hw = (a.latent_height, a.latent_width)
    ae_cfg, channels, stride = _autoencoder(a.autoencoder, directory, hw, a.dtype)
    cfg = replace(preset(a.preset), latent_channels=channels)
    torch.manual_seed(0)
    model = WorldDiT(cfg)
    if a.dtype == "bf16":
        model.to(torch.bfloat16)  # halves the file; the player loads it in bf16 anyway
    text_path = directory / "text.safetensors"
    g = torch.Generator().manual_seed(0)
    save_precomputed(text_path, {PROMPT: torch.randn(max(1, a.text_tokens), cfg.text_dim, generator=g)})
    mem = MemoryConfig(temporal_latents=a.context - 2 * a.chunk, spatial_chunks=1, anchor=True, chunk_size=a.chunk,
                       max_context=a.context)
    rcfg = RolloutConfig(chunk_size=a.chunk, steps=a.steps, schedule=a.schedule, guidance=a.guidance, memory=mem,
                         context_sigma=0.014)
    sampling = asdict(rcfg)
    sampling.update(height=hw[0] * stride, width=hw[1] * stride, model_type="ar", fps=24.0)
    te = TextEncoderConfig(kind="precomputed" if a.text_tokens else "none", path=str(text_path.resolve()) if a.text_tokens else None,
                           dim=cfg.text_dim)
    return save_bundle(directory / "bundle", model, model_cfg=cfg, autoencoder_cfg=ae_cfg, text_encoder_cfg=te,
                       sampling=sampling, meta={"stage": "benchmark"}, overwrite=True)


def session(player: WorldPlayer, image: np.ndarray, chunks: int) -> list:
    player.reset(image, PROMPT if player.bundle.text_encoder.name == "precomputed" else None, seed=0)
    for i in range(chunks):
        player.step(MOVES[i % len(MOVES)])
    return player.chunk_timings


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    tiny = a.preset == "tiny"
    a.latent_height = a.latent_height or (6 if tiny else 30)
    a.latent_width = a.latent_width or (10 if tiny else 52)
    a.dtype = a.dtype or ("bf16" if torch.device(a.device).type == "cuda" else "fp32")
    if a.autoencoder is None:
        a.autoencoder = "patch"
        if not tiny:
            try:
                import diffusers  # noqa: F401

                a.autoencoder = "hunyuan15"
            except ImportError:
                print("diffusers is not importable: using the patch autoencoder (decode time ~0)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="infer_speed_") as tmp:
        path = build_bundle(a, Path(a.bundle_dir) if a.bundle_dir else Path(tmp))
        player = WorldPlayer.from_bundle(path, device=a.device, dtype=a.dtype, offload=a.offload,
                                         decode_overlap=a.decode_overlap)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (player.height, player.width, 3), dtype=np.uint8)
        if a.warmup_chunks:
            session(player, image, a.warmup_chunks)
        if torch.device(a.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(a.device)
        chunks = session(player, image, a.chunks)
        t = player.timings()
        peak = torch.cuda.max_memory_allocated(a.device) / 2**30 if torch.device(a.device).type == "cuda" else None

    full = [c for c in chunks if c.context_latents == a.context]
    result = {
        "device": torch.cuda.get_device_name(a.device) if torch.device(a.device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": a.preset, "autoencoder": a.autoencoder, "dtype": a.dtype, "offload": a.offload,
        "video": f"{player.height}x{player.width}", "latent": f"{a.latent_height}x{a.latent_width}",
        "chunk": a.chunk, "context": a.context, "schedule": a.schedule, "steps": player.rollout.num_steps,
        "guidance": a.guidance, "text_tokens": a.text_tokens, "decode_overlap": a.decode_overlap,
        "params": sum(p.numel() for p in player.bundle.model.parameters()),
        "load_s": t["load_s"], "reset_s": t["reset_s"], "time_to_first_chunk_s": t["time_to_first_chunk_s"],
        "chunk_latency_s": t["chunk_latency_s"],
        "steady_chunks": len(full),
        "steady_latency_s": summarize([c.total_s for c in full]),
        "steady_model_s": summarize([c.model_s for c in full]),
        "steady_decode_s": summarize([c.decode_s for c in full]),
        "frames_per_s": t["frames_per_s"],
        "steady_frames_per_s": (sum(c.num_frames for c in full) / sum(c.total_s for c in full)) if full else None,
        "peak_memory_gib": peak,
        "chunks": t["chunks"],
    }
    print(f"{result['device']} | {a.preset} ({result['params'] / 1e9:.2f}B) {a.dtype}{' offload' if a.offload else ''} | "
          f"video {result['video']} (latent {result['latent']}), chunk {a.chunk}, context {a.context}, "
          f"{result['steps']} steps ({a.schedule}, cfg {a.guidance}), {a.autoencoder} AE")
    print(f"load {t['load_s']:.2f} s | reset {t['reset_s']:.3f} s | first chunk {t['time_to_first_chunk_s']:.3f} s")
    print("chunk  ctx  frames  model_s  decode_s  total_s")
    for c in chunks:
        print(f"{c.index:5d} {c.context_latents:4d} {c.num_frames:7d} {c.model_s:8.3f} {c.decode_s:9.3f} {c.total_s:8.3f}")
    lat = t["chunk_latency_s"]
    print(f"all chunks: median {lat['median']:.3f} s, p90 {lat['p90']:.3f} s | {t['frames_per_s']:.1f} frames/s")
    if full:
        s, m, d = result["steady_latency_s"], result["steady_model_s"], result["steady_decode_s"]
        print(f"steady state (context {a.context}, {len(full)} chunks): median {s['median']:.3f} s (model {m['median']:.3f}, "
              f"decode {d['median']:.3f}), p90 {s['p90']:.3f} s | {result['steady_frames_per_s']:.1f} frames/s")
    if peak is not None:
        print(f"peak GPU memory {peak:.1f} GiB")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
