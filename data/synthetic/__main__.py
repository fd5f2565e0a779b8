"""Generate a synthetic dataset: shards in the clip contract, a preview, and one summary line.

    python -m data.synthetic --out DIR --clips N --frames F --size S \
        --trajectory random|revisit|orbit|mixed --seed N [--video-format lossless|mp4|raw] [--scenes K] \
        [--device cuda --batch B --workers W]

Clip i uses scene ``i % K`` (K defaults to N: one scene per clip). Scene and clip seeds derive from
``--seed`` and the indices, so any clip can be regenerated alone with ``make_clip``, and the output
is the same whatever ``--workers`` (processes, ``--threads`` torch threads each; clips are written in
order) and ``--batch`` (clips ray cast per launch sequence). With ``--device cuda`` the workers plan
scenes and trajectories while the main process ray casts batches on the GPU. Writes
``clips-*.tar`` + ``index.json`` (data.shards), ``preview.mp4`` (the first clips back to back),
``preview.png`` (a strip of the first clip) and ``generation.json`` (arguments and config).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.latents import num_latents
from data.shards import ShardWriter
from data.synthetic.config import SyntheticConfig, TrajectoryConfig
from data.synthetic.dataset import DEFAULT_GPU_BATCH, iter_dataset_clips
from data.synthetic.trajectories import TRAJECTORY_KINDS
from data.video import write_mp4, write_png_strip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--clips", type=int, default=8, help="number of clips")
    p.add_argument("--frames", type=int, default=65, help="frames per clip: 1 + 4k (latent-friendly)")
    p.add_argument("--size", type=int, default=64, help="square frame size in pixels")
    p.add_argument("--trajectory", default="mixed", choices=TRAJECTORY_KINDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-format", default="lossless", choices=("lossless", "mp4", "raw"),
                   help="lossless: stacked PNG; raw: uint8 .npy (no encoding: keeps up with --device cuda); mp4: lossy")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where frames are ray cast (cuda: by the main process)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"clips ray cast per launch sequence (default {DEFAULT_GPU_BATCH} on a GPU, 1 on CPU); output is the same")
    p.add_argument("--supersample", type=int, default=1, help="s x s rays per pixel, box-filtered (anti-aliasing)")
    p.add_argument("--no-depth", action="store_true", help="do not store depth maps")
    p.add_argument("--stride", type=int, default=None,
                   help="video frames per latent of the trajectories (default 4); one latent of a held key moves "
                        "--latent-translation / turns --latent-rotation")
    p.add_argument("--latent-translation", type=float, default=None, help="units per latent of a held move key (default 0.08)")
    p.add_argument("--latent-rotation", type=float, default=None, help="degrees per latent of a held turn key (default 3)")
    p.add_argument("--scenes", type=int, default=None, help="distinct scenes (default: one per clip)")
    p.add_argument("--fov", type=float, default=90.0, help="horizontal field of view in degrees")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--preview-clips", type=int, default=4, help="clips shown back to back in preview.mp4")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (scale with the cores: 1 per core); with --device cuda they plan, the GPU renders")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on shared cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.clips < 1:
        raise SystemExit(f"--clips must be >= 1, got {args.clips}")
    if args.size < 1:
        raise SystemExit(f"--size must be >= 1, got {args.size}")
    scenes = args.clips if args.scenes is None else args.scenes
    if scenes < 1:
        raise SystemExit(f"--scenes must be >= 1, got {scenes}")
    if args.workers < 1 or args.threads < 1:
        raise SystemExit(f"--workers and --threads must be >= 1, got {args.workers}, {args.threads}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    motion = TrajectoryConfig()
    for field_name, value in (("stride", args.stride), ("latent_translation", args.latent_translation),
                              ("latent_rotation_deg", args.latent_rotation)):
        if value is not None:
            setattr(motion, field_name, value)
    cfg = SyntheticConfig(num_frames=args.frames, height=args.size, width=args.size, fov_x_deg=args.fov,
                          fps=args.fps, trajectory=args.trajectory, motion=motion, supersample=args.supersample)
    try:
        num_latents(args.frames, cfg.motion.stride)
    except ValueError as exc:
        raise SystemExit(f"--frames: {exc}") from exc
    out = Path(args.out)
    start = time.perf_counter()
    previews: list[np.ndarray] = []
    with ShardWriter(out, prefix="clips", samples_per_shard=args.samples_per_shard, video_format=args.video_format,
                     fps=args.fps, overwrite=args.overwrite) as writer:
        clips = iter_dataset_clips(args.clips, scenes, args.seed, cfg, args.workers, args.threads, args.device, not args.no_depth,
                                   batch=args.batch)
        for i, clip in enumerate(clips):
            writer.write(clip)
            if i < args.preview_clips:
                previews.append(clip["video"])
    if previews:
        write_mp4(out / "preview.mp4", np.concatenate(previews), fps=args.fps)
        write_png_strip(out / "preview.png", previews[0], num=8)
    (out / "generation.json").write_text(json.dumps({"args": vars(args), "config": asdict(cfg)}, indent=1))
    seconds = time.perf_counter() - start
    total = args.clips * args.frames
    print(f"synthetic: {args.clips} clips x {args.frames} frames at {args.size}x{args.size} ({total} frames, "
          f"{args.trajectory}) -> {out} in {seconds:.1f} s ({total / seconds:.0f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
