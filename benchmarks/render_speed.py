"""Frames/s of synthetic dataset generation (``data.synthetic.iter_dataset_clips``), printed as one JSON line.

    python -m benchmarks.render_speed --device cuda --size 128 --frames 65 --clips 256 --batch 32 \
        --workers 12 --supersample 2 [--stride 1] [--warmup 32]

Times the whole generation path the data command runs (scenes, trajectory planning in ``--workers``
processes, batched ray casting on ``--device``, copies back, contract validation), without writing
shards. ``--warmup`` clips (rounded up to whole batches) are generated first and not timed (worker
start-up, CUDA context and allocator warm-up); the timed clips are the next ``--clips`` of the same
dataset. The renderer keeps one batch in flight, so when the timer starts the next batch is already
queued: use ``--clips`` well above ``--batch``. The JSON line has the arguments, ``seconds`` and
``frames_per_s`` (timed clips), ``total_seconds`` and ``total_frames_per_s`` (every clip, from the
call: start-up included) and ``load`` (1-minute load average of the host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import SyntheticConfig, TrajectoryConfig, iter_dataset_clips  # noqa: E402


def measure(device: str, size: int, frames: int, clips: int, batch: int | None, workers: int, supersample: int,
            stride: int, threads: int = 1, warmup: int = 0, seed: int = 0) -> dict:
    """Generate ``warmup`` + ``clips`` clips (one clip per scene, ``mixed`` trajectories) and time the last ``clips``."""
    cfg = SyntheticConfig(num_frames=frames, height=size, width=size, supersample=supersample,
                          motion=TrajectoryConfig(stride=stride))
    per = batch or (32 if torch.device(device).type != "cpu" else 1)
    warmup = -(-warmup // per) * per  # whole batches: a batch's clips come out together
    total = warmup + clips
    t0 = time.perf_counter()
    it = iter_dataset_clips(total, total, seed, cfg, workers=workers, threads=threads, device=device, depth=False, batch=batch)
    seen = 0
    for _ in range(warmup):
        next(it)
        seen += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for clip in it:
        seen += 1
        assert clip["video"].shape == (frames, size, size, 3)
    end = time.perf_counter()
    seconds = end - start
    assert seen == total
    return {"device": device, "size": size, "frames": frames, "clips": clips, "batch": batch, "workers": workers,
            "threads": threads, "supersample": supersample, "stride": stride, "warmup": warmup,
            "seconds": round(seconds, 3), "frames_per_s": round(clips * frames / seconds, 1),
            "total_seconds": round(end - t0, 3), "total_frames_per_s": round(total * frames / (end - t0), 1),
            "load": round(os.getloadavg()[0], 2), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128, help="square frame size")
    p.add_argument("--frames", type=int, default=65, help="frames per clip (1 + stride * k)")
    p.add_argument("--clips", type=int, default=256, help="timed clips")
    p.add_argument("--batch", type=int, default=None, help="clips per launch sequence (default: 32 on a GPU, 1 on CPU)")
    p.add_argument("--workers", type=int, default=1, help="processes (cuda: planning; cpu: planning and rendering)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--supersample", type=int, default=1)
    p.add_argument("--stride", type=int, default=4, help="frames per latent of the trajectories (the pipeline's gpu_small uses 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed clips first, rounded up to whole batches (default: one batch)")
    args = p.parse_args(argv)
    for name in ("size", "frames", "clips", "workers", "threads", "supersample", "stride"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.warmup is not None and args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    warmup = args.warmup if args.warmup is not None else 1
    print(json.dumps(measure(args.device, args.size, args.frames, args.clips, args.batch, args.workers, args.supersample,
                             args.stride, args.threads, warmup)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
