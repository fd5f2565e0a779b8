"""HY-WorldPlay at its released shape through ``WorldPlayer``: peak GPU memory and chunk latency, with and without offload.

Builds a random bundle exactly as ``python -m models.convert worldplay`` writes one (the ``hy15_released``
model: 8.3B HunyuanVideo-1.5 + WorldPlay's action and PRoPE branches, 8.54B; WorldPlay's sampling section
for ``--kind``), with HunyuanVideo-1.5's VAE at its released configuration (random weights) and a
precomputed streams file (LLM + ByT5 + SigLIP slots: 985 + ``--llm-tokens`` text tokens), then streams
chunks at 480x832 through the player after a warm-up session (benchmarks/infer_speed.py's loop).

Offload modes (``--offload``):

* ``none``: everything resident on the GPU;
* ``encoders``: the player's ``offload`` (VAE and text encoder on CPU between uses; the DiT resident);
* ``blocks``: also the DiT's 54 double blocks stay in pinned CPU memory and each is copied to the GPU just
  before it runs (forward pre/post hooks, benchmark-only): weights on the GPU ~ one block + embedders.

It also prints the KV-cache size the layout implies (text + 20 context latents, RoPE and PRoPE heads, 54
blocks), since that, not the weights, decides whether 24 GB can be enough.

    python -m benchmarks.hy15_infer --kind distilled --offload none      # 4-step distilled, no CFG
    python -m benchmarks.hy15_infer --kind ar --offload none --chunks 3  # 50 steps, CFG 6 (two branches)
    python -m benchmarks.hy15_infer --kind distilled --offload blocks    # the 24 GB question
    python -m benchmarks.hy15_infer --tiny --device cpu                  # CPU smoke check of the code path

Status: written for issue 18; the H200 numbers are to be recorded in benchmarks/RESULTS.md from a GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.infer_speed import PROMPT, session
from infer.player import WorldPlayer
from infer.timing import summarize
from models.bundle import save_bundle
from models.config import WorldDiTConfig, preset
from models.convert.worldplay import worldplay_sampling
from models.dit import WorldDiT
from models.text_encoders import StreamLayout, image_key, save_precomputed_streams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="distilled", choices=["distilled", "ar"])
    p.add_argument("--offload", default="none", choices=["none", "encoders", "blocks"])
    p.add_argument("--chunks", type=int, default=6, help="chunks in the timed session (context fills up after 5)")
    p.add_argument("--warmup-chunks", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override the kind's step count (e.g. fewer 50-step chunks)")
    p.add_argument("--llm-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-block, 64-wide model with the same layout (CPU smoke check)")
    p.add_argument("--bundle-dir", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def model_config(tiny: bool) -> WorldDiTConfig:
    cfg = preset("hy15_released")
    if tiny:
        cfg = dataclasses.replace(cfg, latent_channels=4, hidden=64, heads=4, head_dim=16, depth=2, rope_dims=[4, 6, 6],
                                  text_dim=64, vision_dim=12, byt5_dim=20, byt5_hidden=32)
    return cfg


def build_bundle(a: argparse.Namespace, directory: Path, image: np.ndarray) -> Path:
    """A random WorldPlay-layout bundle (bf16 on GPU runs) with a streams file holding the prompt and ``image``."""
    directory.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    vae_kw = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1) if a.tiny else {}
    AutoencoderKLHunyuanVideo15(**vae_kw).save_pretrained(str(directory / "vae"))
    cfg = model_config(a.tiny)
    bf16 = torch.device(a.device).type == "cuda"
    with torch.device(a.device if bf16 else "cpu"):
        model = WorldDiT(cfg)
    if bf16:
        model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised gates / outputs / branches get values, so every path computes
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    layout = StreamLayout(llm_dim=cfg.text_dim, byt5_dim=cfg.byt5_dim, vision_dim=cfg.vision_dim,
                          byt5_tokens=cfg.byt5_tokens, vision_tokens=cfg.vision_tokens)
    texts = {p: (torch.randn(a.llm_tokens, cfg.text_dim, generator=g), torch.randn(12, cfg.byt5_dim, generator=g))
             for p in (PROMPT, "")}
    save_precomputed_streams(directory / "text.safetensors", texts,
                             {image_key(image): torch.randn(cfg.vision_tokens, cfg.vision_dim, generator=g)}, layout)
    sampling = worldplay_sampling(a.kind, height=image.shape[0], width=image.shape[1])
    if a.steps:
        sampling["steps"] = a.steps
    ae = {"kind": "hunyuan15", "path": str((directory / "vae").resolve()), "dtype": "bfloat16" if bf16 else "float32"}
    te = {"kind": "precomputed", "path": str((directory / "text.safetensors").resolve()), "max_length": 1000}
    path = save_bundle(directory / "bundle", model, model_cfg=cfg, autoencoder_cfg=ae, text_encoder_cfg=te,
                       sampling=sampling, meta={"stage": "benchmark"}, overwrite=True)
    del model
    return path


def stream_blocks(model: torch.nn.Module, device: str) -> None:
    """Keep ``model.blocks`` in pinned CPU memory; copy each to ``device`` just before it runs and drop it after."""
    for blk in model.blocks:
        blk.to("cpu")
        for p in blk.parameters():
            p.data = p.data.pin_memory()

        def pre(module, args, kwargs):
            module.to(device, non_blocking=True)

        def post(module, args, kwargs, out):
            module.to("cpu")
            return out

        blk.register_forward_pre_hook(pre, with_kwargs=True)
        blk.register_forward_hook(post, with_kwargs=True)
    torch.cuda.empty_cache()


def kv_cache_gib(cfg: WorldDiTConfig, text_tokens: int, context_latents: int, chunk: int, tokens_per_latent: int,
                 bytes_per: int = 2) -> float:
    """K and V of text + context (+ room for the chunk) in every block, RoPE and PRoPE heads (2 x hidden per token)."""
    branches = 2 if cfg.camera else 1
    per_token = 2 * branches * cfg.hidden * bytes_per
    return cfg.depth * (text_tokens + (context_latents + chunk) * tokens_per_latent) * per_token / 2**30


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    H, W = (64, 96) if a.tiny else (480, 832)
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    cuda = torch.device(a.device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="hy15_infer_") as tmp:
        path = build_bundle(a, Path(a.bundle_dir) if a.bundle_dir else Path(tmp), image)
        player = WorldPlayer.from_bundle(path, device=a.device, dtype="bf16" if cuda else "fp32",
                                         offload=a.offload != "none")
        if a.offload == "blocks":
            if not cuda:
                raise SystemExit("--offload blocks needs a CUDA device")
            stream_blocks(player.bundle.model, a.device)
        if a.warmup_chunks:
            session(player, image, a.warmup_chunks)
        if cuda:
            torch.cuda.synchronize(a.device)
            torch.cuda.reset_peak_memory_stats(a.device)
        chunks = session(player, image, a.chunks)
        t = player.timings()
        peak = torch.cuda.max_memory_allocated(a.device) / 2**30 if cuda else None
        cfg = player.bundle.model.cfg
    ctx = player.rollout_cfg.memory.max_context
    text_tokens = cfg.vision_tokens + cfg.byt5_tokens + a.llm_tokens
    kv = kv_cache_gib(cfg, text_tokens, ctx, player.rollout_cfg.chunk_size, (H // 16) * (W // 16))
    full = [c for c in chunks if c.context_latents == ctx]
    guidance = player.rollout_cfg.guidance
    result = {
        "device": torch.cuda.get_device_name(a.device) if cuda else "cpu", "torch": torch.__version__,
        "kind": a.kind, "offload": a.offload, "params": sum(p.numel() for p in player.bundle.model.parameters()),
        "video": f"{H}x{W}", "steps": player.rollout.num_steps, "guidance": guidance, "text_tokens": text_tokens,
        "chunk_latency_s": t["chunk_latency_s"], "time_to_first_chunk_s": t["time_to_first_chunk_s"],
        "steady_latency_s": summarize([c.total_s for c in full]), "steady_model_s": summarize([c.model_s for c in full]),
        "frames_per_s": t["frames_per_s"], "peak_memory_gib": peak,
        "kv_cache_gib_per_branch": kv, "kv_cache_gib": kv * (2 if guidance != 1 else 1),
        "fits_24gib": None if peak is None else peak <= 24.0,
    }
    print(json.dumps(result, indent=1, default=str))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
