"""WorldDiT step benchmark: training forward+backward, or one cached denoising step, in bf16.

Default shape = the HY-World 480p training window: 24 latents of 30x52 tokens (6 chunks of 4),
256 text tokens, PRoPE on, block-causal over chunks of 4 latents.

    python -m benchmarks.dit_step                                   # base preset, auto backend
    python -m benchmarks.dit_step --backend sdpa flex masked        # compare backends (one row each)
    python -m benchmarks.dit_step --preset hy15 --grad-ckpt --param-dtype bf16
    python -m benchmarks.dit_step --mode infer --preset hy15 --param-dtype bf16   # context fill + cached step
    python -m benchmarks.dit_step --preset tiny --latents 8 --height 4 --width 4   # CPU smoke check

``train``: one step = forward + backward (no optimizer) under bf16 autocast. ``infer`` (no grad):
``fill_context_cache`` over all latents but the last chunk, then one denoising step on the last chunk
attending to the cache; both are timed. Times come from CUDA events after warm-up (perf_counter on
CPU); the table reports the median, tokens/s (video tokens processed per second), peak memory and
model TFLOP/s (matmul + attention FLOPs of the layout, counting backward as 2x forward, plus one
forward recompute with checkpointing).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import replace

import torch

from models.attention import BACKENDS, MaskSpec, resolve_backend
from models.config import preset
from models.dit import WorldDiT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=["tiny", "small", "base", "hy15"])
    p.add_argument("--backend", nargs="+", default=["auto"], choices=list(BACKENDS))
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latents", type=int, default=24)
    p.add_argument("--height", type=int, default=30, help="latent height (tokens with patch 1)")
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--text", type=int, default=256, help="text tokens (0 = none)")
    p.add_argument("--chunk", type=int, default=4, help="latents per chunk (0 = bidirectional)")
    p.add_argument("--no-camera", action="store_true", help="disable the PRoPE branch")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def make_inputs(cfg, a, device):
    B, T, H, W = a.batch, a.latents, a.height, a.width
    g = torch.Generator(device="cpu").manual_seed(0)
    ang = torch.randn(B, T, generator=g) * 0.2
    w2c = torch.eye(4).repeat(B, T, 1, 1)
    w2c[..., 0, 0], w2c[..., 0, 2], w2c[..., 2, 0], w2c[..., 2, 2] = ang.cos(), ang.sin(), -ang.sin(), ang.cos()
    w2c[..., :3, 3] = torch.randn(B, T, 3, generator=g)
    K = torch.tensor([[0.9, 0, 0.5], [0, 1.6, 0.5], [0, 0, 1.0]]).repeat(B, T, 1, 1)
    inp = dict(
        x=torch.randn(B, cfg.latent_channels, T, H, W, generator=g),
        sigma=torch.rand(B, T, generator=g),
        actions=torch.randint(0, cfg.num_actions, (B, T), generator=g),
        w2c=w2c, K=K,
        image_latent=torch.randn(B, cfg.latent_channels, H, W, generator=g),
    )
    if a.text:
        inp["text"] = torch.randn(B, a.text, cfg.text_dim, generator=g)
    return {k: v.to(device) for k, v in inp.items()}


def model_flops(cfg, a, q_frames: int, k_frames: int, causal_chunk: int | None, train: bool) -> float:
    """Matmul + attention FLOPs of one call over q_frames latents attending to k_frames (>= q_frames)."""
    D, N = cfg.hidden, (a.height // cfg.patch[1]) * (a.width // cfg.patch[2])
    tokens = a.batch * q_frames * N
    per_token = 2 * (3 * D * D + D * D + 2 * D * int(cfg.mlp_ratio * D))  # qkv, proj, MLP
    if cfg.camera and not a.no_camera:
        per_token += 2 * D * D  # prope_proj
    linear = cfg.depth * tokens * per_token
    ctx = k_frames - q_frames
    if causal_chunk:  # chunk i sees text + context + chunks <= i
        starts = range(0, q_frames, causal_chunk)
        pairs = sum(min(causal_chunk, q_frames - s) * N * (a.text + (ctx + min(s + causal_chunk, q_frames)) * N)
                    for s in starts)
    else:
        pairs = q_frames * N * (a.text + k_frames * N)
    passes = 2 if (cfg.camera and not a.no_camera) else 1
    attn = cfg.depth * a.batch * passes * 4 * cfg.hidden * pairs
    fwd = linear + attn
    if not train:
        return fwd
    return fwd * (4 if a.grad_ckpt else 3)


def timed(fn, a, device) -> list[float]:
    for _ in range(a.warmup):
        fn()
    times = []
    for _ in range(a.steps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)


def bench(a, backend: str) -> list[dict]:
    device = torch.device(a.device)
    cfg = replace(preset(a.preset), attn_backend=backend, grad_checkpointing=a.grad_ckpt,
                  camera=not a.no_camera and preset(a.preset).camera)
    if a.text and cfg.text_dim == 0:
        raise SystemExit(f"preset {a.preset} has no text stream; pass --text 0")
    with torch.device(device):
        model = WorldDiT(cfg)
    if a.param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    inp = make_inputs(cfg, a, device)
    chunk = a.chunk or None
    N = (a.height // cfg.patch[1]) * (a.width // cfg.patch[2])
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if a.mode == "train":
        model.train()

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(inp["x"], inp["sigma"], **{k: v for k, v in inp.items() if k not in ("x", "sigma")},
                            chunk_size=chunk)
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        t = statistics.median(timed(step, a, device))
        flops = model_flops(cfg, a, a.latents, a.latents, chunk, train=True)
        rows.append(dict(what="fwd+bwd", time=t, tokens=a.batch * a.latents * N, flops=flops))
    else:
        model.eval()
        c = a.chunk or 4
        ctx_T = a.latents - c
        if ctx_T < 1:
            raise SystemExit("--mode infer needs --latents > --chunk (context + one chunk)")
        ctx = {k: (v[:, :, :ctx_T] if k == "x" else v[:, :ctx_T]) for k, v in inp.items()
               if k not in ("text", "image_latent")}
        cur = {k: (v[:, :, ctx_T:] if k == "x" else v[:, ctx_T:]) for k, v in inp.items()
               if k not in ("text", "image_latent")}
        cache = model.new_cache()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            if a.text:
                model.fill_text_cache(cache, inp["text"])

            def fill():
                model.fill_context_cache(cache, **ctx, image_latent=inp["image_latent"], chunk_size=c, causal=False)

            def denoise():
                x, s = cur["x"], cur["sigma"]
                model(x, s, **{k: v for k, v in cur.items() if k not in ("x", "sigma")}, cache=cache)

            tf = statistics.median(timed(fill, a, device))
            td = statistics.median(timed(denoise, a, device))
        rows.append(dict(what=f"context fill ({ctx_T} lat)", time=tf, tokens=a.batch * ctx_T * N,
                         flops=model_flops(cfg, a, ctx_T, ctx_T, None, train=False)))
        rows.append(dict(what=f"cached step ({c} lat)", time=td, tokens=a.batch * c * N,
                         flops=model_flops(cfg, a, c, a.latents, None, train=False)))
    mem = peak_memory_gib(device)
    # the benchmark passes no text mask, so ``auto`` resolves as for unpadded keys
    shown = resolve_backend(backend, device, MaskSpec.full(1, 1), needs_grad=a.mode == "train")
    for r in rows:
        r.update(backend=shown if backend == "auto" else backend, mem=mem)
    return rows


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with torch.device("meta"):
        n_params = WorldDiT(replace(preset(a.preset), camera=not a.no_camera and preset(a.preset).camera)).num_parameters()
    print(f"# WorldDiT {a.preset} ({n_params / 1e6:,.1f}M params) on {name}, torch {torch.__version__}")
    print(f"# mode {a.mode}, batch {a.batch}, {a.latents} latents x {a.height}x{a.width}, text {a.text}, "
          f"chunk {a.chunk or 'bidirectional'}, PRoPE {'off' if a.no_camera else 'on'}, "
          f"params {a.param_dtype}, grad ckpt {a.grad_ckpt}, median of {a.steps} after {a.warmup} warm-up")
    header = f"| {'backend':8} | {'what':24} | {'median s':>9} | {'tokens/s':>10} | {'TFLOP/s':>8} | {'peak GiB':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for backend in a.backend:
        for r in bench(a, backend):
            print(f"| {r['backend']:8} | {r['what']:24} | {r['time']:9.4f} | {r['tokens'] / r['time']:10.0f} | "
                  f"{r['flops'] / r['time'] / 1e12:8.2f} | {r['mem']:8.2f} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
