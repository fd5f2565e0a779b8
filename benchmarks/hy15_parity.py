"""HunyuanVideo-1.5 at its released shape: diffusers vs the converted WorldDiT, and the WorldPlay round trip (GPU).

Builds diffusers' ``HunyuanVideo15Transformer3DModel`` with the released 480p I2V configuration (54 blocks,
hidden 2048, 16 x 128 heads, Qwen2.5-VL 3584 / ByT5 1472 / SigLIP 1152 streams; ``--depth`` fewer blocks for
a quick check) with random weights directly on the device, converts its state dict with models/convert
(diffusers -> official layout -> WorldDiT), and runs both on the same 480x832 latents, timesteps, LLM /
ByT5 / SigLIP tokens (padded) and first-frame latent. Reports the relative L2 error of the WorldDiT output
against diffusers' (both in ``--dtype``; with bf16 the two differ by rounding order only) and of each against
diffusers in fp32 (``rel_err_worlddit_vs_fp32`` should match ``rel_err_diffusers_vs_fp32``), their times, the
peak memory, and whether WorldDiT -> WorldPlay layout -> WorldDiT reproduces every tensor bit for bit.

    python -m benchmarks.hy15_parity                       # 8.3B, bf16, 5 latents at 480x832 (one H200)
    python -m benchmarks.hy15_parity --depth 2 --dtype fp32 # quick; fp32 agrees to ~1e-6
    python -m benchmarks.hy15_parity --device cpu --depth 1 --frames 2 --height 4 --width 6  # CPU smoke check

Status: written for issue 18; the full-size numbers are to be recorded in benchmarks/RESULTS.md from a GPU run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

RELEASED = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, text_embed_dim=3584,
                text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 1/fan_in), norm weights ~ 1, other vectors small (generated on the parameter's device)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.dim() > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@torch.no_grad()
def run_parity(depth: int = 54, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, frames: int = 5,
               height: int = 30, width: int = 52, llm_tokens: int = 256, seed: int = 0) -> dict[str, Any]:
    """One comparison; latent size frames x height x width (480x832 video = 30x52 latents)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from models.convert.diffusers import config_for_official, diffusers_to_official
    from models.convert.hunyuan import config_from_official, official_to_worlddit, worlddit_to_official
    from models.dit import WorldDiT
    from models.text_encoders import StreamLayout, pack_text_streams

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = dict(RELEASED, num_layers=depth)
    with torch.device(device):
        ref = HunyuanVideo15Transformer3DModel(**config)
    _randomize(ref, seed)
    ref.eval()  # fp32 first: its output is the yardstick for both low-precision runs

    g = torch.Generator(device=device).manual_seed(seed + 1)
    C = config["out_channels"]
    x = torch.randn(1, C, frames, height, width, generator=g, device=device)
    img = torch.randn(1, C, height, width, generator=g, device=device)
    sigma = torch.tensor([0.8333], device=device)
    llm = torch.randn(1, llm_tokens, 3584, generator=g, device=device)
    lm = torch.arange(llm_tokens, device=device)[None] < int(0.8 * llm_tokens)
    by = torch.randn(1, 256, 1472, generator=g, device=device)
    bm = torch.arange(256, device=device)[None] < 20
    vis = torch.randn(1, 729, 1152, generator=g, device=device)
    cond = torch.zeros(1, frames, dtype=torch.bool, device=device)
    cond[:, 0] = True
    m = cond.to(x.dtype)[:, None, :, None, None]
    x_in = torch.cat([x, img[:, :, None] * m, m.expand(-1, 1, -1, height, width)], 1)

    def diffusers_forward(dt: torch.dtype) -> torch.Tensor:
        return ref(x_in.to(dt), (sigma * 1000).to(dt), llm.to(dt), lm.long(), encoder_hidden_states_2=by.to(dt),
                   encoder_attention_mask_2=bm.long(), image_embeds=vis.to(dt)).sample.float()

    expect32 = diffusers_forward(torch.float32)
    ref.to(dtype)

    t0 = time.perf_counter()
    official = diffusers_to_official(ref.state_dict(), where="diffusers (random)")
    cfg = config_from_official(official, config_for_official(config), text_sigma="video", text_attends_video=True)
    state = official_to_worlddit(official, cfg, where="official (random)")
    del official
    with torch.device("meta"):
        model = WorldDiT(cfg)
    model.load_state_dict(state, assign=True)
    model.eval()
    convert_s = time.perf_counter() - t0

    # WorldDiT -> WorldPlay layout -> WorldDiT, bit for bit (the WorldPlay branches added as zeros first)
    from models.convert.worldplay import add_worldplay_branches

    wp_state = dict(state)
    wp_cfg = add_worldplay_branches(wp_state, cfg)
    wp_state = {k: v.to(device) for k, v in wp_state.items()}
    back = official_to_worlddit(worlddit_to_official(wp_state, wp_cfg), wp_cfg)
    roundtrip = set(back) == set(wp_state) and all(torch.equal(back[k], wp_state[k]) for k in wp_state)
    del back, wp_state

    _sync(device)
    t0 = time.perf_counter()
    expect = diffusers_forward(dtype)
    _sync(device)
    ref_s = time.perf_counter() - t0
    del ref

    layout = StreamLayout(llm_dim=3584)
    text, tmask = pack_text_streams([llm[0][lm[0]].cpu()], [by[0][bm[0]].cpu()], [vis[0].cpu()], layout)
    _sync(device)
    t0 = time.perf_counter()
    got = model(x.to(dtype), sigma[:, None].expand(1, frames).contiguous(), text=text.to(device, dtype),
                text_mask=tmask.to(device), image_latent=img.to(dtype), cond_mask=cond).float()
    _sync(device)
    ours_s = time.perf_counter() - t0
    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return {
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "depth": depth,
        "params": sum(p.numel() for p in model.parameters()), "latents": f"{frames}x{height}x{width}",
        "text_tokens": int(text.shape[1]), "rel_err": rel_err(got, expect), "max_abs_err": float((got - expect).abs().max()),
        # both low-precision runs against diffusers in fp32 (same weights before rounding): "within bf16 tolerance"
        # means WorldDiT's error is of the size of diffusers' own
        "rel_err_worlddit_vs_fp32": rel_err(got, expect32), "rel_err_diffusers_vs_fp32": rel_err(expect, expect32),
        "out_rms": float(expect.pow(2).mean().sqrt()), "roundtrip_bit_exact": roundtrip, "convert_s": convert_s,
        "diffusers_forward_s": ref_s, "worlddit_forward_s": ours_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=54)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--height", type=int, default=30, help="latent rows (480 px / 16)")
    p.add_argument("--width", type=int, default=52, help="latent columns (832 px / 16)")
    p.add_argument("--llm-tokens", type=int, default=256)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = run_parity(a.depth, a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32, a.frames, a.height,
                   a.width, a.llm_tokens)
    print(json.dumps(r, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
