"""ViZDoom source throughput (stored frames/s) on CPU: the engine, one recorder, a pool of recorders, the CLI.

    python -m benchmarks.vizdoom_throughput                                    # 160x120 and 320x240
    python -m benchmarks.vizdoom_throughput --sizes 320x240 --workers 1 4 16 --no-cli

Rows (65-frame clips, 2 tics per frame, 4 clips per episode, default agents):
- ``engine``: ``DoomEnv.step`` turning in place (render + state read at the native size).
- ``record``: ``record_clips`` in this process: map loads, warm-up and gap walks (unrecorded),
  agents, crop/resize, contract validation. Counts stored frames only.
- ``pool``: K worker processes running ``record_task`` (what the CLI's workers run), clips
  pickled back to this process, nothing written; timed after every worker has started.
- ``cli``: ``python -m data.vizdoom`` end to end with K workers (worker start-up, lossless PNG
  shards and stats included); needs PyAV and webdataset.
Each engine uses one core; other load on the machine is not controlled (the header prints it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

from data.vizdoom.env import DoomConfig, DoomEnv
from data.vizdoom.record import RecordConfig, clip_seed, init_worker, record_clips, record_task


def _parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def engine_fps(size: tuple[int, int], steps: int) -> float:
    with DoomEnv(DoomConfig(width=size[0], height=size[1])) as env:
        env.reset("MAP01", seed=0)
        keys = np.zeros(8, dtype=bool)
        keys[4] = True  # turn in place: never blocked, always a new view
        t = time.perf_counter()
        for _ in range(steps):
            env.step(keys)
        return steps / (time.perf_counter() - t)


def record_fps(size: tuple[int, int], clips: int, frames: int) -> float:
    cfg = RecordConfig(num_frames=frames)
    with DoomEnv(DoomConfig(width=size[0], height=size[1])) as env:
        record_clips(env, cfg, clip_seed(123, 0), 1)  # warm caches
        t = time.perf_counter()
        done = 0
        for e, first in enumerate(range(0, clips, cfg.clips_per_episode)):
            done += len(record_clips(env, cfg, clip_seed(0, e), min(cfg.clips_per_episode, clips - first)))
        return done * frames / (time.perf_counter() - t)


def pool_fps(size: tuple[int, int], clips: int, frames: int, workers: int) -> float:
    cfg = RecordConfig(num_frames=frames)
    per = cfg.clips_per_episode
    tasks = [(first, min(per, clips - first), clip_seed(0, e)) for e, first in enumerate(range(0, clips, per))]
    pool = mp.get_context("spawn").Pool(workers, init_worker, (DoomConfig(width=size[0], height=size[1]), cfg, 0))
    try:
        pool.map(time.sleep, [1.0] * workers, chunksize=1)  # every worker started and initialised
        t = time.perf_counter()
        done = sum(len(episode) for episode in pool.imap_unordered(record_task, tasks))
        return done * frames / (time.perf_counter() - t)
    finally:  # close + join (not terminate): workers exit cleanly and close their engines
        pool.close()
        pool.join()


def cli_fps(size: tuple[int, int], clips: int, frames: int, workers: int) -> float:
    from data.vizdoom.__main__ import main as cli_main

    with tempfile.TemporaryDirectory() as d:
        out = cli_main(["--out", d, "--clips", str(clips), "--frames", str(frames), "--size", f"{size[0]}x{size[1]}",
                        "--workers", str(workers), "--preview", "0"])
    return out["frames_per_second"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[(160, 120), (320, 240)])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--clips", type=int, default=16, help="clips per record row; pool/cli rows use max(clips, 8 x workers)")
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--engine-steps", type=int, default=2000)
    p.add_argument("--no-cli", action="store_true", help="skip the cli rows (machines without PyAV/webdataset)")
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        name = f"{size[0]}x{size[1]}"
        rows.append({"row": "engine", "size": name, "workers": 1, "fps": engine_fps(size, args.engine_steps)})
        rows.append({"row": "record", "size": name, "workers": 1, "fps": record_fps(size, args.clips, args.frames)})
        for w in args.workers:
            n = max(args.clips, 8 * w)
            rows.append({"row": "pool", "size": name, "workers": w, "fps": pool_fps(size, n, args.frames, w)})
            if not args.no_cli:
                rows.append({"row": "cli", "size": name, "workers": w, "fps": cli_fps(size, n, args.frames, w)})
    print(f"cpus={os.cpu_count()} load1={os.getloadavg()[0]:.1f} frames/clip={args.frames} tics/frame=2")
    print("| row | size | workers | stored frames/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['size']} | {r['workers']} | {r['fps']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
