"""Throughput of the synthetic-world renderer (frames/s), on CPU by default.

    python benchmarks/render_throughput.py [--sizes 64 128] [--threads 2] [--device cpu]

Renders realistic clips (random scenes, `mixed` key-driven trajectories, 90 deg FOV) and prints
one line per size: frames/s of ``render`` (RGB + depth), best and median over repeats, plus the
whole ``make_clip`` path (scene, trajectory, render, validation) at the first size. Prints only;
the lead records the numbers in benchmarks/RESULTS.md. On a shared machine, take the best of a
few runs: other processes on the same cores slow every op.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", type=int, default=4, help="clips (scenes) per measurement")
    p.add_argument("--frames", type=int, default=129, help="frames per clip (1 + 4k)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scenes = [Scene.random(1000 + i) for i in range(args.clips)]
    poses = [make_trajectory("mixed", s, args.frames, np.random.default_rng(i))[1].float().to(device) for i, s in enumerate(scenes)]
    total = args.clips * args.frames
    print(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
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
        print(f"make_clip {size}x{size}: {total / min(times):.0f} frames/s (median {total / statistics.median(times):.0f})")


if __name__ == "__main__":
    main()
