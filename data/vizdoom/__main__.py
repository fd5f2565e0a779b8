"""Record ViZDoom clips into shards: ``python -m data.vizdoom --out DIR --clips N --frames F --size WxH``.

Workers each run their own headless engine; clips are recorded in episodes of
--clips-per-episode (one map load each), episode e from a seed derived from (--seed, e), so the
dataset does not depend on --workers. The main process writes the shards
(one writer, ordered by clip index), a preview (mp4 + png strip of the first clips) and
``vizdoom_stats.json``: throughput, keys-vs-poses agreement, revisit return errors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.vizdoom.env import DoomConfig
from data.vizdoom.record import RecordConfig, clip_seed, init_worker, key_agreement, pose_key_thresholds, record_task


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x240, got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"size must be at least 8x8, got {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.vizdoom", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset directory (shards, index.json, preview/, vizdoom_stats.json)")
    p.add_argument("--clips", type=int, required=True)
    p.add_argument("--frames", type=int, default=65, help="frames per clip (1 + 4k fills whole stride-4 latents)")
    p.add_argument("--size", type=parse_size, default=(320, 240), help="stored WxH (default 320x240)")
    p.add_argument("--wad", default="freedoom2", help="freedoom1, freedoom2 or a path to an IWAD")
    p.add_argument("--map", default=None, help="one map (e.g. MAP01, E1M1); default: a random map per clip")
    p.add_argument("--trajectory", choices=("random", "revisit", "mixed"), default="mixed")
    p.add_argument("--revisit-prob", type=float, default=0.5, help="share of revisit clips with --trajectory mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clips-per-episode", type=int, default=4, help="clips recorded in one episode (one map load)")
    p.add_argument("--tics-per-frame", type=int, default=2, help="35 Hz game tics per frame (2: 17.5 fps)")
    p.add_argument("--move-speed", type=int, default=4, help="Doom forwardmove units per held key (walk 25)")
    p.add_argument("--turn-speed", type=float, default=0.75, help="yaw degrees per tic while a yaw key is held")
    p.add_argument("--map-units-per-unit", type=float, default=64.0, help="scale of poses: map units per scene unit")
    p.add_argument("--square-pixels", action="store_true", help="crop so that fx = fy (narrower view than Doom's)")
    p.add_argument("--monsters", action="store_true", help="spawn monsters (off by default)")
    p.add_argument("--video-format", choices=("lossless", "mp4"), default="lossless")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--preview", type=int, default=2, help="write mp4 + png previews of this many clips")
    p.add_argument("--overwrite", action="store_true")
    return p


def _summary(clips_stats: list[dict], revisits: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
        if not len(v):
            return {}
        return {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}

    out = {k: stat([c[k] for c in clips_stats]) for k in ("action", "translation", "rotation", "steady")}
    if revisits:
        out["revisit_mirror_median_map_units"] = stat([r["mirror_median_map_units"] for r in revisits])
        out["revisit_mirror_max_map_units"] = stat([r["mirror_max_map_units"] for r in revisits])
        out["revisit_end_distance_map_units"] = stat([r["end_distance_map_units"] for r in revisits])
        out["revisit_end_yaw_error_deg"] = stat([r["end_yaw_error_deg"] for r in revisits])
        out["revisit_farthest_map_units"] = stat([r["farthest_map_units"] for r in revisits])
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.clips < 1 or args.workers < 1 or args.frames < 2 or args.clips_per_episode < 1:
        raise SystemExit("--clips, --workers and --clips-per-episode must be >= 1 and --frames >= 2")
    from data.shards import ShardWriter
    from data.video import write_mp4, write_png_strip

    w, h = args.size
    env_cfg = DoomConfig(
        wad=args.wad, map=args.map, width=w, height=h, tics_per_frame=args.tics_per_frame, move_speed=args.move_speed,
        turn_speed_deg=args.turn_speed, map_units_per_unit=args.map_units_per_unit, monsters=args.monsters,
        square_pixels=args.square_pixels,
    )
    rec_cfg = RecordConfig(num_frames=args.frames, trajectory=args.trajectory, revisit_prob=args.revisit_prob,
                           clips_per_episode=args.clips_per_episode)
    thresholds = pose_key_thresholds(env_cfg)
    out = Path(args.out)
    per = args.clips_per_episode
    tasks = [(first, min(per, args.clips - first), clip_seed(args.seed, e)) for e, first in enumerate(range(0, args.clips, per))]
    fps = 35.0 / args.tics_per_frame
    stats: list[dict] = []
    revisits: list[dict] = []
    rejected = 0
    t0 = time.perf_counter()
    with ShardWriter(out, prefix="vizdoom", samples_per_shard=args.samples_per_shard, video_format=args.video_format,
                     fps=fps, overwrite=args.overwrite) as writer:
        if args.workers == 1:
            init_worker(env_cfg, rec_cfg, args.seed)
            results = map(record_task, tasks)
            pool = None
        else:  # spawn: the engine and torch are not fork-safe; workers import from data.vizdoom.record
            pool = mp.get_context("spawn").Pool(args.workers, init_worker, (env_cfg, rec_cfg, args.seed))
            results = pool.imap(record_task, tasks, chunksize=1)
        try:
            for episode in results:
                rejected += episode[-1]["meta"]["attempt"]
                for clip in episode:
                    i = clip["meta"]["clip_index"]
                    writer.write(clip)
                    stats.append(key_agreement(clip, 4, thresholds))
                    if "revisit" in clip["meta"]:
                        revisits.append(clip["meta"]["revisit"])
                    if i < args.preview:
                        write_mp4(out / "preview" / f"clip{i:04d}.mp4", clip["video"], fps=fps)
                        write_png_strip(out / "preview" / f"clip{i:04d}.png", clip["video"], num=8)
                    print(f"clip {i + 1}/{args.clips} {clip['meta']['scene']} {clip['meta']['trajectory']}", file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    elapsed = time.perf_counter() - t0
    summary = {
        "clips": args.clips,
        "frames": args.clips * args.frames,
        "seconds": elapsed,
        "frames_per_second": args.clips * args.frames / elapsed,
        "workers": args.workers,
        "rejected_attempts": rejected,
        "key_thresholds": asdict(thresholds),
        "agreement_per_latent_stride4": _summary(stats, revisits),
        "env": asdict(env_cfg),
        "trajectory": args.trajectory,
    }
    (out / "vizdoom_stats.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("clips", "frames", "seconds", "frames_per_second")}), flush=True)
    return summary


if __name__ == "__main__":
    main()
