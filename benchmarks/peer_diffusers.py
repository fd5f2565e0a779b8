"""Peer comparison: diffusers' HunyuanVideo-1.5 transformer and WorldDiT timed side by side, in one process.

The peer is ``diffusers.HunyuanVideo15Transformer3DModel`` with random weights at our preset's width,
depth, heads, RoPE split, refiner depth, text width and channels (``base``: hidden 1536 = 12 x 128,
14 double blocks; ``hy15``: the released 8.3B shape), fed the same token count: 24 latents of 30x52
(37,440 video tokens, patch 1) and 256 text tokens. Its extra ByT5 and SigLIP-image token streams are
given zero tokens, so every text-stream token is one of the 256.

    python -m benchmarks.peer_diffusers                         # base shape
    python -m benchmarks.peer_diffusers --preset hy15 --ckpt    # 8.3B shape, both with activation checkpointing
    python -m benchmarks.peer_diffusers --preset tiny --device cpu --latents 4 --height 4 --width 6 --text 8 --steps 2

Measured for each model, with the same function (benchmarks/timing.py: CUDA events, median of
``--steps`` after ``--warmup``) and the same treatment (fp32 weights under bf16 autocast on CUDA, one
random batch that is never all zeros): ``fwd`` = one forward under ``no_grad``; ``fwd+bwd`` = forward,
MSE loss against a random target, backward, ``zero_grad``. WorldDiT runs in two layouts: as trained
(block-causal chunks of 4 + the PRoPE pass) and like the peer (bidirectional, no PRoPE branch).
``ratio`` = our time / the peer's time for the same measurement (< 1: we are faster). TFLOP/s use
benchmarks/flops.py for both models (the peer's formula is ``peer_flops``: joint bidirectional
attention over video + text tokens). The peer attends through diffusers' stock processor: SDPA with a
dense boolean [B, 1, S, S] mask, which on GPU selects the memory-efficient kernel.

A measurement that runs out of memory is recorded as such and, with ``--ckpt-on-oom``, retried with
activation checkpointing (diffusers' ``enable_gradient_checkpointing`` for the peer, the trainer's
per-block checkpointing for WorldDiT).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from benchmarks.flops import Flops, peer_flops, worlddit_flops
from benchmarks.timing import Report, environment, peak_memory_gib, reset_peak_memory, time_calls, with_oom_retry
from benchmarks.train_step import build_worlddit, make_inputs, model_kwargs_of
from infer.timing import summarize
from models.config import PRESETS, WorldDiTConfig, preset
from models.flow import add_noise
from train.distributed import apply_activation_checkpointing

__all__ = ["build_peer", "peer_inputs", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["base"], choices=sorted(PRESETS), help="shape(s) of both models")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latents", type=int, default=24)
    p.add_argument("--height", type=int, default=30)
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--chunk", type=int, default=4, help="block-causal chunk of our trained layout")
    p.add_argument("--layouts", nargs="+", default=["trained", "peer"], choices=["trained", "peer"],
                   help="our layouts: as trained (block-causal + PRoPE) and/or like the peer (bidirectional, no PRoPE)")
    p.add_argument("--what", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--ckpt", action="store_true", help="activation checkpointing for both models from the start")
    p.add_argument("--ckpt-on-oom", action="store_true", help="retry an out-of-memory measurement with checkpointing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md (rewritten after every row)")
    return p.parse_args(argv)


def build_peer(cfg: WorldDiTConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """diffusers' HunyuanVideo15Transformer3DModel at ``cfg``'s shape, random weights, built on ``device``."""
    from diffusers import HunyuanVideo15Transformer3DModel

    if cfg.patch[1] != cfg.patch[2]:
        raise ValueError(f"peer: diffusers' model has a square patch; preset patch is {cfg.patch}")
    if cfg.text_dim == 0:
        raise ValueError("peer: the preset has no text stream (text_dim=0); the peer needs text tokens")
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return HunyuanVideo15Transformer3DModel(
                in_channels=2 * cfg.latent_channels + 1, out_channels=cfg.latent_channels,
                num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, num_layers=cfg.depth,
                num_refiner_layers=cfg.text_refiner_depth, mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch[1],
                patch_size_t=1, text_embed_dim=cfg.text_dim, rope_axes_dim=tuple(cfg.rope_dims), rope_theta=cfg.rope_theta,
            )
    finally:
        torch.set_default_dtype(previous)


def peer_inputs(peer: nn.Module, *, batch: int, latents: int, height: int, width: int, text: int,
                device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Random peer inputs: [noisy ; image ; mask] channels, timestep, ``text`` text tokens, no ByT5 / image tokens."""
    c = peer.config
    g = torch.Generator().manual_seed(seed)
    B = batch
    inp = dict(
        hidden_states=torch.randn(B, c.in_channels, latents, height, width, generator=g),
        timestep=torch.rand(B, generator=g) * 1000.0,
        encoder_hidden_states=torch.randn(B, text, c.text_embed_dim, generator=g),
        encoder_attention_mask=torch.ones(B, text),
        encoder_hidden_states_2=torch.zeros(B, 0, c.text_embed_2_dim),
        encoder_attention_mask_2=torch.zeros(B, 0),
        image_embeds=torch.zeros(B, 0, c.image_embed_dim),
    )
    return {k: v.to(device) for k, v in inp.items()}


def _measure(fn_fwd: Callable[[], Tensor], model: nn.Module, target: Tensor, what: str, a: argparse.Namespace,
             device: torch.device) -> tuple[list[float], float]:
    """(step times, peak GiB) of ``what`` ("fwd" under no_grad, or "fwd+bwd") with the shared timing function."""
    cuda = device.type == "cuda"

    def fwd(_timer) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            fn_fwd()

    def fwd_bwd(_timer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = fn_fwd()
        (out.float() - target).square().mean().backward()
        model.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    times, _ = time_calls(fwd if what == "fwd" else fwd_bwd, warmup=a.warmup, reps=a.steps, device=device)
    return times, peak_memory_gib(device)


def _row(model: str, layout: str, what: str, times: list[float], peak: float, flops: Flops, tokens: int,
         ckpt: bool) -> dict[str, Any]:
    t = summarize(times)
    total = flops.forward if what == "fwd" else flops.model
    return {"model": model, "layout": layout, "what": what, "ckpt": "yes" if ckpt else "no", "median_s": t["median"],
            "p90_s": t["p90"], "times_s": times, "tokens_per_s": tokens / t["median"], "tflop": total / 1e12,
            "tflops": total / t["median"] / 1e12, "peak_gib": peak}


def _oom_row(report: Report, base: dict[str, Any]) -> Callable[[bool, str], None]:
    def add(ckpt: bool, message: str) -> None:
        report.add({**base, "ckpt": "yes" if ckpt else "no", "note": f"out of memory: {message}"})
    return add


def bench_preset(a: argparse.Namespace, name: str, report: Report) -> None:
    device = torch.device(a.device)
    base_cfg = preset(name)
    if a.text < 1:
        raise SystemExit("peer_diffusers: the peer needs text tokens (--text >= 1)")
    tokens = a.batch * a.latents * a.height * a.width
    shape = dict(batch=a.batch, latents=a.latents, height=a.height, width=a.width, text=a.text, device=device)
    peer_rows: dict[str, dict[str, Any]] = {}

    for what in a.what:
        def run_peer(ckpt: bool, what: str = what) -> dict[str, Any]:
            peer = build_peer(base_cfg, device)
            if ckpt:
                peer.enable_gradient_checkpointing()
            peer.train(what != "fwd")
            inp = peer_inputs(peer, **shape)
            target = torch.randn(inp["hidden_states"].shape[0], base_cfg.latent_channels, *inp["hidden_states"].shape[2:],
                                 device=device)
            times, peak = _measure(lambda: peer(**inp, return_dict=False)[0], peer, target, what, a, device)
            flops = peer_flops(hidden=base_cfg.hidden, depth=base_cfg.depth, refiner_depth=base_cfg.text_refiner_depth,
                               in_channels=2 * base_cfg.latent_channels + 1, out_channels=base_cfg.latent_channels,
                               text_dim=base_cfg.text_dim, batch=a.batch, video_tokens=tokens // a.batch,
                               text_tokens=a.text, mlp_ratio=base_cfg.mlp_ratio, patch=base_cfg.patch[1],
                               mode="forward" if what == "fwd" else "train")
            return _row(f"diffusers HunyuanVideo15 ({name} shape)", "bidirectional joint", what, times, peak, flops,
                        tokens, ckpt)

        row = with_oom_retry(run_peer, ckpt=a.ckpt, retry=a.ckpt_on_oom, device=device,
                             on_oom=_oom_row(report, {"model": f"diffusers HunyuanVideo15 ({name} shape)", "what": what}))
        if row is not None:
            peer_rows[what] = row
            report.add(row)

    for layout in a.layouts:
        trained = layout == "trained"
        cfg = replace(base_cfg, camera=base_cfg.camera and trained)
        chunk = a.chunk if trained else None
        label = f"block-causal {a.chunk} + PRoPE" if trained else "bidirectional, no PRoPE"
        for what in a.what:
            def run_ours(ckpt: bool, what: str = what) -> dict[str, Any]:
                model = build_worlddit(cfg, device, torch.float32)
                if ckpt:
                    apply_activation_checkpointing(model)
                model.train(what != "fwd")
                inp, eps = make_inputs(cfg, chunk=chunk, **shape)
                x = add_noise(inp.x0, eps, inp.sigma)
                kwargs = model_kwargs_of(inp)
                times, peak = _measure(lambda: model(x, inp.sigma, **kwargs), model, eps - inp.x0, what, a, device)
                flops = worlddit_flops(cfg, batch=a.batch, frames=a.latents, height=a.height, width=a.width, text=a.text,
                                       chunk=chunk, mode="forward" if what == "fwd" else "train")
                return _row(f"WorldDiT {name}", label, what, times, peak, flops, tokens, ckpt)

            row = with_oom_retry(run_ours, ckpt=a.ckpt, retry=a.ckpt_on_oom, device=device,
                                 on_oom=_oom_row(report, {"model": f"WorldDiT {name}", "layout": label, "what": what}))
            if row is not None:
                if what in peer_rows:
                    row["ratio"] = row["median_s"] / peer_rows[what]["median_s"]
                report.add(row)


COLUMNS = [
    ("model", "model", ""), ("layout", "attention layout", ""), ("what", "measured", ""), ("ckpt", "act. ckpt", ""),
    ("median_s", "median s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"), ("tflop", "TFLOP", ".4g"),
    ("tflops", "TFLOP/s", ".4g"), ("peak_gib", "peak GiB", ".1f"), ("ratio", "ours / peer time", ".2f"), ("note", "note", ""),
]


def main(argv: list[str] | None = None) -> Report:
    a = parse_args(argv)
    device = torch.device(a.device)
    settings = dict(batch=a.batch, latents=a.latents, latent_hw=f"{a.height}x{a.width}", text=a.text,
                    weights="fp32", amp="bf16" if device.type == "cuda" else "fp32", warmup=a.warmup, steps=a.steps)
    command = "python -m benchmarks.peer_diffusers " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    report = Report(a.out, "Peer: diffusers HunyuanVideo15Transformer3DModel vs WorldDiT, same process", command,
                    environment(device), settings, COLUMNS)
    print(f"# {report.title}\n# {report.env}\n# {settings}\n{report.header()}", flush=True)
    for name in a.preset:
        bench_preset(a, name, report)
    return report


if __name__ == "__main__":
    main()
