"""Throughput of the synthetic-world renderer (frames/s), on CPU by default.

    python benchmarks/render_throughput.py [--sizes 64 128] [--threads 2 1] [--device cpu]

Renders realistic clips (random scenes, `mixed` key-driven trajectories, 90 deg FOV) and prints,
per torch thread count, one line per size: frames/s of ``render`` (RGB + depth), best and median
over repeats, plus the whole ``make_clip`` path (scene, trajectory, render, validation) at the
first size. Prints only; the lead records the numbers in benchmarks/RESULTS.md.

The header shows the 1-minute load average. When other processes compete for the same cores,
every multi-threaded op waits at its barrier for a descheduled thread and 2-thread throughput
collapses (10x was seen at load 6 on 2 cores) while 1 thread degrades gracefully: compare both
lines, and use processes (``python -m data.synthetic --workers``) to scale data generation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.geometry import make_intrinsics  # noqa: E402
from data.synthetic import Scene, SyntheticConfig, make_clip, make_trajectory, render  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch.set_num_threads values (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", type=int, default=4, help="clips (scenes) per measurement")
    p.add_argument("--frames", type=int, default=129, help="frames per clip (1 + 4k)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    scenes = [Scene.random(1000 + i) for i in range(args.clips)]
    poses = [make_trajectory("mixed", s, args.frames, np.random.default_rng(i))[1].float().to(device) for i, s in enumerate(scenes)]
    total = args.clips * args.frames
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, "
              f"{args.clips} scenes x {args.frames} frames, best / median of {args.repeats}")
        for size in args.sizes:
            K = make_intrinsics(90.0, size, size).to(device)
            for s, c2w in zip(scenes, poses):  # warm-up
                render(s, c2w[:8], K, size, size)
            times = []
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                for s, c2w in zip(scenes, poses):
                    render(s, c2w, K, size, size)
                _sync(device)
                times.append(time.perf_counter() - start)
            print(f"render {size}x{size}: {total / min(times):.0f} frames/s (median {total / statistics.median(times):.0f})", flush=True)
        if device.type == "cpu":
            size = args.sizes[0]
            cfg = SyntheticConfig(num_frames=args.frames, height=size, width=size)
            make_clip(0, cfg)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for i in range(args.clips):
                    make_clip(i, cfg)
                times.append(time.perf_counter() - start)
            print(f"make_clip {size}x{size}: {total / min(times):.0f} frames/s (median {total / statistics.median(times):.0f})", flush=True)


if __name__ == "__main__":
    main()
