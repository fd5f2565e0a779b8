"""Attention kernels on WorldDiT's own layouts: which backend, split or fused branches, per mode.

Attention is ~80 % of a ``base`` step's FLOPs at the 480p-like layout, so this benchmark times it
alone, with the model's mask layouts (text 256 + 30x52-token latents, chunks of 4):

* ``train``    24 latents, block-causal, forward + backward (the output gradient reaches the kernel
               through the model's head merge, i.e. with the strides the model gives it);
* ``context``  the rollout's context pass: 20 latents, block-causal, forward only;
* ``step``     one cached denoising step: 4 latents vs [text ; 20 context latents ; own], forward only.

Branches: ``split`` runs the RoPE and the PRoPE attention as two calls of ``heads`` heads (what the
model did first); ``fused`` runs them as one call of ``2 x heads`` heads (the PRoPE branch's heads
stacked after the RoPE branch's), the same arithmetic in one launch per key prefix.

    python -m benchmarks.attention_kernels --preset base --backend flex sdpa cudnn --isolate

``--isolate`` runs every (layout, backend, branches) point in its own process, so a kernel that
faults (an illegal address poisons the CUDA context) is recorded as a failure and the rest still
run. Each point also checks its output (and, for ``train``, its q/k/v gradients) against the masked
reference computed on the same inputs in fp32 (memory-efficient SDPA over
the key prefixes on GPU, the dense mask on CPU), and reports the largest relative error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from typing import Any

import torch
from torch import Tensor

from benchmarks.timing import Report, environment, peak_memory_gib, reset_peak_memory, time_calls
from infer.timing import summarize
from models.attention import BACKENDS, MaskSpec, attention
from models.config import PRESETS, preset
from models.dit import _chunk_segments

__all__ = ["layout_spec", "run_point", "main"]

LAYOUTS = ("train", "context", "step")


def layout_spec(layout: str, *, text: int, tokens: int, latents: int, context: int, chunk: int) -> MaskSpec:
    """The model's MaskSpec for a layout (same segment rule as WorldDiT.forward)."""
    txt = [(text, -1)] if text else []
    if layout == "train":
        own = _chunk_segments(latents, tokens, chunk)
        return MaskSpec(tuple(own), tuple(txt + own), True)
    if layout == "context":
        own = _chunk_segments(context, tokens, chunk)
        return MaskSpec(tuple(own), tuple(txt + own), True)
    if layout == "step":
        ctx = _chunk_segments(context, tokens, None)
        own = _chunk_segments(chunk, tokens, chunk, first_chunk=1)
        return MaskSpec(tuple(own), tuple(txt + ctx + own), True)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def run_point(layout: str, backend: str, branches: str, *, heads: int, head_dim: int, spec: MaskSpec, warmup: int,
              reps: int, device: torch.device, check: bool, memory: str = "token") -> dict[str, Any]:
    """Time one (layout, backend, branches) point; returns a result row."""
    grad = layout == "train"
    B, D = 1, head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    calls = 1 if branches == "fused" else 2
    Hc = 2 * heads if branches == "fused" else heads

    def rnd(S: int) -> Tensor:  # [B, H, S, D] views of token-major ([B, S, H, D]) or head-major memory
        t = (torch.randn(B, S, Hc, D, generator=g) * 0.5).to(device, torch.bfloat16).transpose(1, 2)
        return (t if memory == "token" else t.contiguous()).requires_grad_(grad)

    qkv = [(rnd(spec.sq), rnd(spec.sk), rnd(spec.sk)) for _ in range(calls)]
    gos = [torch.randn(B, spec.sq, Hc * D, generator=g).to(device, torch.bfloat16) for _ in range(calls)]

    def one(q: Tensor, k: Tensor, v: Tensor, go: Tensor) -> Tensor:
        o = attention(q, k, v, spec, backend)
        if grad:  # the model merges heads ([B, H, S, D] -> [B, S, H*D]) before the output projection
            o.transpose(1, 2).reshape(B, spec.sq, Hc * D).backward(go)
        return o

    def step(_timer) -> None:
        with torch.set_grad_enabled(grad):
            for (q, k, v), go in zip(qkv, gos):
                one(q, k, v, go)

    reset_peak_memory(device)
    totals, _ = time_calls(step, warmup=warmup, reps=reps, device=device)
    med = summarize(totals)["median"]
    pairs = sum((q1 - q0) * k1 for q0, q1, k1 in spec.prefix_plan())
    # Both branches: 2·heads heads of 4·pairs·D forward FLOPs; backward counted as 2x forward (as benchmarks/flops.py).
    flops = 4 * pairs * D * 2 * heads * (3.0 if grad else 1.0)
    row = {"layout": layout, "backend": backend, "branches": branches, "memory": memory, "median_ms": med * 1e3,
           "tflops": flops / med / 1e12, "peak_gib": peak_memory_gib(device), "status": "ok"}
    if check:  # compare against an fp32 reference on the first call's inputs (memory-efficient SDPA on GPU)
        q, k, v = (t.detach().float().requires_grad_(grad) for t in qkv[0])
        with torch.set_grad_enabled(grad):
            ref = attention(q, k, v, spec, "sdpa" if device.type == "cuda" else "masked")
            if grad:
                ref.transpose(1, 2).reshape(B, spec.sq, Hc * D).backward(gos[0].float())
        for t in qkv[0]:
            t.grad = None
        with torch.set_grad_enabled(grad):
            out = one(*qkv[0], gos[0])
        errs = [_rel_err(out, ref)] + ([_rel_err(a.grad, b.grad) for a, b in zip(qkv[0], (q, k, v))] if grad else [])
        row["max_rel_err"] = max(errs)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=sorted(PRESETS))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--backend", nargs="+", default=["flex", "sdpa", "cudnn"], choices=[b for b in BACKENDS if b != "auto"])
    p.add_argument("--branches", nargs="+", default=["split", "fused"], choices=["split", "fused"])
    p.add_argument("--memory", default="token", choices=["token", "head"],
                   help="q/k/v memory: token-major [B, S, H, D] (the model's) or head-major [B, H, S, D]")
    p.add_argument("--latents", type=int, default=24)
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--height", type=int, default=30)
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference comparison")
    p.add_argument("--isolate", action="store_true", help="one process per point (survives kernel faults)")
    p.add_argument("--point-json", action="store_true", help=argparse.SUPPRESS)  # internal: child of --isolate
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    tokens = args.height * args.width
    columns = [("layout", "layout", ""), ("backend", "backend", ""), ("branches", "branches", ""), ("memory", "q/k/v memory", ""),
               ("median_ms", "median ms", ".2f"), ("tflops", "TFLOP/s", ".0f"), ("max_rel_err", "max rel. err", ".1e"),
               ("peak_gib", "peak GiB", ".1f"), ("status", "status", "")]
    cmd = "python -m benchmarks.attention_kernels " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = Report(args.out, f"Attention kernels, {args.preset} layouts", cmd, environment(device),
                    {"heads": cfg.heads, "head_dim": cfg.head_dim, "tokens/latent": tokens, "text": args.text,
                     "latents": args.latents, "context": args.context, "chunk": args.chunk}, columns)
    for layout in args.layouts:
        spec = layout_spec(layout, text=args.text, tokens=tokens, latents=args.latents, context=args.context,
                           chunk=args.chunk)
        for backend in args.backend:
            for branches in args.branches:
                if args.isolate and not args.point_json:
                    child = [sys.executable, "-m", "benchmarks.attention_kernels", "--point-json", "--preset", args.preset,
                             "--layouts", layout, "--backend", backend, "--branches", branches, "--device", args.device,
                             "--memory", args.memory]
                    child += [f"--{k}={getattr(args, k)}" for k in ("latents", "context", "chunk", "height", "width",
                                                                      "text", "warmup", "reps")]
                    child += ["--no-check"] if args.no_check else []
                    r = subprocess.run(child, capture_output=True, text=True)
                    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
                    if r.returncode == 0 and lines:
                        report.add(json.loads(lines[-1]))
                    else:
                        err = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
                        report.add({"layout": layout, "backend": backend, "branches": branches,
                                    "status": f"failed (rc {r.returncode}): {err}"})
                    continue
                try:
                    row = run_point(layout, backend, branches, heads=cfg.heads, head_dim=cfg.head_dim, spec=spec,
                                    warmup=args.warmup, reps=args.reps, device=device, check=not args.no_check,
                                    memory=args.memory)
                except Exception as e:  # noqa: BLE001 - a failing kernel is a result
                    row = {"layout": layout, "backend": backend, "branches": branches,
                           "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:140]}"}
                    if args.point_json:
                        raise
                if args.point_json:
                    print(json.dumps(row), flush=True)
                else:
                    report.add(row)
    return report


if __name__ == "__main__":
    main()
