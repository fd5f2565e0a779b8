"""A synthetic dataset as a function of (seed, index): which scene and seeds clip i uses, generated in order.

Clip ``i`` of a dataset with ``scenes`` scenes uses scene ``i % scenes``; the scene seed and the clip
seed derive from the dataset seed and the indices, so any clip can be regenerated alone and the
clips are the same whatever the number of worker processes or the batch size.

On a GPU the host work (scenes, trajectory planning) runs in ``workers`` processes while the main
process ray casts batches of ``batch`` clips, one launch sequence per batch, and copies batch k back
while the GPU renders batch k + 1.
"""

from __future__ import annotations

import multiprocessing as mp
from itertools import islice
from typing import Iterable, Iterator

import torch

from data.synthetic.clip import attach_frames, derive_seed, plan_clip, render_clips
from data.synthetic.config import SyntheticConfig
from data.synthetic.scene import Scene

__all__ = ["DEFAULT_GPU_BATCH", "dataset_clip", "iter_dataset_clips", "plan_dataset_clip"]

DEFAULT_GPU_BATCH = 32  # clips per launch sequence on a GPU (128x128, 65 frames, 2x2 rays: ~0.5 GB of frames)

Plan = tuple[Scene, dict]  # a clip without its frames (clip.plan_clip)


def plan_dataset_clip(index: int, scenes: int, seed: int, config: SyntheticConfig, cache: dict[int, Scene] | None = None) -> Plan:
    """Scene and frameless clip ``index`` of the dataset (seed, scenes); ``cache`` keeps built scenes."""
    s = index % scenes
    scene = cache.get(s) if cache is not None else None
    if scene is None:
        scene = Scene.random(derive_seed(seed, 0, s), config.scene)
        if cache is not None:
            cache[s] = scene
    scene, clip = plan_clip(derive_seed(seed, 1, index), config, scene=scene)
    clip["meta"].update(clip_index=index, scene_index=s)
    return scene, clip


def _render_now(plans: list[Plan], config: SyntheticConfig, device: str | torch.device, depth: bool) -> list[dict]:
    video, depth_map = render_clips(plans, config, device)
    return attach_frames(plans, video.cpu().numpy(), depth_map.cpu().numpy() if depth else None)


def dataset_clip(
    index: int, scenes: int, seed: int, config: SyntheticConfig, cache: dict[int, Scene] | None = None,
    device: str = "cpu", depth: bool = True,
) -> dict:
    """Clip ``index`` of the dataset (seed, scenes), rendered on ``device``; ``cache`` keeps built scenes."""
    return _render_now([plan_dataset_clip(index, scenes, seed, config, cache)], config, device, depth)[0]


# Worker processes: scenes built so far, per (dataset seed, scene index) (a pool serves one dataset).
_WORKER_SCENES: dict[tuple[int, int], Scene] = {}


def _worker_plans(indices: list[int], scenes: int, seed: int, config: SyntheticConfig) -> list[Plan]:
    cache = {s: sc for (sd, s), sc in _WORKER_SCENES.items() if sd == seed}
    plans = [plan_dataset_clip(i, scenes, seed, config, cache) for i in indices]
    _WORKER_SCENES.update({(seed, s): sc for s, sc in cache.items()})
    return plans


def _plan_job(args: tuple[int, int, int, SyntheticConfig]) -> Plan:
    index, scenes, seed, config = args
    return _worker_plans([index], scenes, seed, config)[0]


def _clip_job(args: tuple[list[int], int, int, SyntheticConfig, bool]) -> list[dict]:
    indices, scenes, seed, config, depth = args
    return _render_now(_worker_plans(indices, scenes, seed, config), config, "cpu", depth)


def _groups(plans: Iterable[Plan], size: int) -> Iterator[list[Plan]]:
    it = iter(plans)
    while group := list(islice(it, size)):
        yield group


def _stream(plans: Iterable[Plan], config: SyntheticConfig, device: torch.device, depth: bool, batch: int) -> Iterator[dict]:
    """Render ``plans`` in batches on ``device``, one batch in flight: batch k + 1 is queued on the
    device before batch k is copied back, validated and handed on."""
    cuda = device.type == "cuda"
    pending = None
    for group in _groups(plans, batch):
        video, depth_map = render_clips(group, config, device)
        if cuda:  # asynchronous copies into pinned memory, read once the event has passed
            host = (video.to("cpu", non_blocking=True), depth_map.to("cpu", non_blocking=True) if depth else None)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = (video.cpu(), depth_map.cpu() if depth else None), None
        if pending is not None:
            yield from _finish(*pending)
        pending = (group, host, done)
    if pending is not None:
        yield from _finish(*pending)


def _finish(group: list[Plan], host: tuple, done) -> list[dict]:
    if done is not None:
        done.synchronize()
    video, depth_map = host
    return attach_frames(group, video.numpy(), depth_map.numpy() if depth_map is not None else None)


def iter_dataset_clips(
    num_clips: int, scenes: int, seed: int, config: SyntheticConfig, workers: int = 1, threads: int = 1,
    device: str = "cpu", depth: bool = True, batch: int | None = None,
) -> Iterator[dict]:
    """Clips 0..num_clips-1 in order; the same clips whatever ``workers`` and ``batch``.

    ``batch`` clips are ray cast per launch sequence (default: 1 on CPU, ``DEFAULT_GPU_BATCH``
    otherwise). On CPU, ``workers`` > 1 spawns processes that each plan and render a batch at a
    time. On another device the main process renders every batch there, and ``workers`` > 1
    spawns processes that only plan (scenes and trajectories), ahead of the renderer.

    Each process runs ``threads`` torch threads. One thread per process is the robust default:
    the CPU renderer's ops are small, and on cores shared with other processes every
    multi-threaded op waits for a descheduled thread (2 threads ran ~10x slower than 1 at load 6
    on 2 cores), whereas processes over clips scale with the cores and degrade gracefully.
    """
    dev = torch.device(device)
    gpu = dev.type != "cpu"
    batch = (DEFAULT_GPU_BATCH if gpu else 1) if batch is None else batch
    if num_clips < 0 or scenes < 1:
        raise ValueError(f"need num_clips >= 0 and scenes >= 1, got {num_clips}, {scenes}")
    if batch < 1 or workers < 1 or threads < 1:
        raise ValueError(f"batch, workers and threads must be >= 1, got {batch}, {workers}, {threads}")
    if workers <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cache: dict[int, Scene] = {}
            plans = (plan_dataset_clip(i, scenes, seed, config, cache) for i in range(num_clips))
            if gpu:
                yield from _stream(plans, config, dev, depth, batch)
            else:
                for group in _groups(plans, batch):
                    yield from _render_now(group, config, dev, depth)
        finally:
            torch.set_num_threads(previous)
        return
    with mp.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        if gpu:  # clip-sized planning jobs keep every worker busy whatever the batch; imap keeps the order
            jobs = [(i, scenes, seed, config) for i in range(num_clips)]
            yield from _stream(pool.imap(_plan_job, jobs, chunksize=2), config, dev, depth, batch)
        else:
            jobs = [(list(range(i, min(i + batch, num_clips))), scenes, seed, config, depth) for i in range(0, num_clips, batch)]
            for clips in pool.imap(_clip_job, jobs):
                yield from clips
