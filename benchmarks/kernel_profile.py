"""Where the GPU time goes: one repetition under ``torch.profiler``, kernels grouped by what they do.

Used by ``--profile`` in benchmarks/train_step.py and benchmarks/rollout.py. Kernel names are
matched in order against :data:`CATEGORIES` (first match wins); the table gives each category's
device time and share, and the top kernels by device time, so a figure like "attention is 70 % of
the step" is measured rather than assumed.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

__all__ = ["CATEGORIES", "categorize", "profile_kernels", "format_profile"]

CATEGORIES: list[tuple[str, str]] = [
    ("attention", r"flash|fmha|attention|attn|sdpa|cudnn_generated|triton_tem_fused|flex"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|matmul|bmm"),
    ("compiled chains", r"^triton_(poi|red|per)_"),  # models/fused.py under torch.compile
    ("copy / cat", r"copy|cat|CatArray|memcpy|memset|fill"),
    ("norm / elementwise", r"elementwise|vectorized|reduce|norm|triton_poi|triton_red|triton_per|unrolled|silu|gelu|rsqrt"),
]


def categorize(name: str) -> str:
    """The category of a kernel name (``other`` when nothing matches)."""
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return cat
    return "other"


def profile_kernels(fn: Callable[[], Any], device: torch.device, top: int = 25) -> dict[str, Any]:
    """Run ``fn()`` once under the profiler; {"total_ms", "categories": {cat: ms}, "top": [(name, ms, calls)]}.

    On CPU the CPU op times are used (there are no kernels).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    per: dict[str, list[float]] = {}
    for e in prof.events():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time
        else:
            if e.cpu_parent is not None:  # top-level CPU ops only, so nothing is counted twice
                continue
            us = e.cpu_time
        stat = per.setdefault(e.name, [0.0, 0])
        stat[0] += us / 1e3
        stat[1] += 1
    cats: dict[str, float] = {}
    for name, (ms, _) in per.items():
        cats[categorize(name)] = cats.get(categorize(name), 0.0) + ms
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return {"total_ms": sum(cats.values()), "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top": [(name[:90], ms, int(n)) for name, (ms, n) in ranked]}


def format_profile(title: str, prof: dict[str, Any]) -> str:
    """Markdown: the category table, then the top kernels."""
    total = prof["total_ms"] or 1.0
    lines = [f"Kernel time of {title}: {prof['total_ms']:.1f} ms on the device", "",
             "| category | ms | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {ms / total:.1%} |" for c, ms in prof["categories"].items()]
    lines += ["", "| kernel | ms | calls |", "|---|---|---|"]
    lines += [f"| `{n}` | {ms:.1f} | {k} |" for n, ms, k in prof["top"]]
    return "\n".join(lines)
