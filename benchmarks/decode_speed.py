"""VAE decode time per chunk: streaming (``Autoencoder.stream_decoder``) vs the overlapped re-decode.

HunyuanVideo-1.5's VAE at its released configuration (random weights; ``--tiny`` for a CPU-sized
one), latents of a ``--height`` x ``--width`` video, chunks of ``--chunk`` latents (4 = 16 frames):

* ``overlap``: what the player did before issue 20: decode the chunk together with ``--overlap``
  earlier latents and keep the chunk's 4L frames;
* ``stream``: decode only the chunk with the per-layer causal caches of the previous chunks.

Both run the same sequence of steady-state chunks (after a first chunk and ``--warmup`` chunks,
untimed), timed with CUDA events (``benchmarks.timing``). Also reported: TFLOP per chunk (counted on
the meta device with ``FlopCounterMode``), the achieved TFLOP/s, peak GPU memory, and with
``--check`` the max abs difference between the streamed frames and one whole-video decode.

    python -m benchmarks.decode_speed --json decode_speed.json                         # H200: bf16, 480x832
    python -m benchmarks.decode_speed --tiny --device cpu --dtype fp32 --check --json decode_speed_tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.timing import environment, peak_memory_gib, reset_peak_memory, time_calls
from infer.timing import summarize
from models.autoencoders import HunyuanVideo15VAE

TINY = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a CPU-sized random VAE (channels 8-16) instead of the released shape")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="VAE dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunk", type=int, default=4, help="latents per chunk (4 -> 16 frames)")
    p.add_argument("--overlap", type=int, default=4, help="earlier latents the overlapped decode re-decodes")
    p.add_argument("--warmup", type=int, default=1, help="untimed steady-state chunks per method")
    p.add_argument("--reps", type=int, default=3, help="timed steady-state chunks per method")
    p.add_argument("--check", action="store_true", help="also compare the streamed frames with a whole-video decode")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build(tiny: bool, device: torch.device | str, dtype: torch.dtype) -> HunyuanVideo15VAE:
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLHunyuanVideo15(**(TINY if tiny else {}))
    return HunyuanVideo15VAE(vae.to(dtype=dtype))


def count_tflop(tiny: bool, shape: tuple[int, int, int], chunk: int, overlap: int) -> dict[str, float]:
    """TFLOP of one steady-state chunk for each method, counted on the meta device (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    ae = build(tiny, "meta", torch.float32)
    C, (h, w) = ae.latent_channels, shape[1:]

    def flops(fn: Callable[[], Any]) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e12

    z = torch.empty(1, C, overlap + chunk, h, w, device="meta")
    sd = ae.stream_decoder()
    sd.decode(torch.empty(1, C, chunk, h, w, device="meta"))  # the first chunk: fills the caches
    return {"overlap": flops(lambda: ae.decode(z)),
            "stream": flops(lambda: sd.decode(torch.empty(1, C, chunk, h, w, device="meta")))}


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    ae = build(a.tiny, device, dtype)
    s, L, O = ae.spatial_stride, a.chunk, a.overlap
    if a.height % s or a.width % s:
        raise SystemExit(f"--height/--width must be multiples of {s}")
    h, w = a.height // s, a.width // s
    n_chunks = 1 + a.warmup + a.reps  # the first chunk, then warm-up and timed steady-state chunks
    N = n_chunks * L
    if O > L * (1 + a.warmup):
        raise SystemExit(f"--overlap {O} reaches before the video's start at the first timed chunk; raise --warmup")
    z = torch.randn(1, ae.latent_channels, N, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    settings = {"tiny": a.tiny, "dtype": str(dtype).replace("torch.", ""), "height": a.height, "width": a.width,
                "latent_hw": [h, w], "chunk_latents": L, "chunk_frames": L * ae.temporal_stride,
                "overlap_latents": O, "warmup": a.warmup, "reps": a.reps}
    print(f"decode_speed: {settings}", flush=True)
    results: dict[str, Any] = {}

    with torch.inference_mode():
        # overlapped: chunk k decodes latents [kL - O, kL + L) and keeps the last 4L frames
        k = [1]

        def overlapped(_timer) -> None:
            a0, b0 = k[0] * L - O, k[0] * L + L
            ae.decode(z[:, :, a0:b0])[:, :, -L * ae.temporal_stride:]
            k[0] += 1

        reset_peak_memory(device)
        times, _ = time_calls(overlapped, warmup=a.warmup, reps=a.reps, device=device)
        results["overlap"] = {"chunk_s": summarize(times), "times_s": times, "peak_gib": peak_memory_gib(device)}
        print(f"overlap: median {1e3 * results['overlap']['chunk_s']['median']:.1f} ms per chunk", flush=True)

        sd = ae.stream_decoder()
        frames: list[torch.Tensor] = []
        reset_peak_memory(device)
        first, _ = time_calls(lambda _t: frames.append(sd.decode(z[:, :, :L]).cpu()), warmup=0, reps=1, device=device)
        k[0] = 1

        def streamed(_timer) -> None:
            out = sd.decode(z[:, :, k[0] * L : k[0] * L + L])
            if a.check:
                frames.append(out.cpu())
            k[0] += 1

        times, _ = time_calls(streamed, warmup=a.warmup, reps=a.reps, device=device)
        results["stream"] = {"chunk_s": summarize(times), "times_s": times, "first_chunk_s": first[0],
                             "peak_gib": peak_memory_gib(device)}
        print(f"stream: median {1e3 * results['stream']['chunk_s']['median']:.1f} ms per chunk "
              f"(first chunk {1e3 * first[0]:.1f} ms)", flush=True)

        if a.check:
            whole = ae.decode(z).cpu()
            got = torch.cat(frames, dim=2)
            results["stream_vs_whole_max_abs"] = float((got - whole).abs().max())
            print(f"stream vs whole-video decode: max abs diff {results['stream_vs_whole_max_abs']:.2e}", flush=True)

    tflop = count_tflop(a.tiny, (N, h, w), L, O)
    for name in ("overlap", "stream"):
        med = results[name]["chunk_s"]["median"]
        results[name]["tflop_per_chunk"] = tflop[name]
        results[name]["tflop_per_s"] = tflop[name] / med if med > 0 else float("nan")
    results["speedup"] = results["overlap"]["chunk_s"]["median"] / results["stream"]["chunk_s"]["median"]
    print(f"TFLOP per chunk: overlap {tflop['overlap']:.3g}, stream {tflop['stream']:.3g}; "
          f"speedup {results['speedup']:.2f}x", flush=True)
    report = {"benchmark": "decode_speed", "command": "python -m benchmarks.decode_speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "env": environment(device), "settings": settings, "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
