"""A synthetic dataset as a function of (seed, index): which scene and seeds clip i uses, generated in order.

Clip ``i`` of a dataset with ``scenes`` scenes uses scene ``i % scenes``; the scene seed and the clip
seed derive from the dataset seed and the indices, so any clip can be regenerated alone and the
clips are the same whatever the number of worker processes.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Iterator

import torch

from data.synthetic.clip import derive_seed, make_clip
from data.synthetic.config import SyntheticConfig
from data.synthetic.scene import Scene

__all__ = ["dataset_clip", "iter_dataset_clips"]


def dataset_clip(
    index: int, scenes: int, seed: int, config: SyntheticConfig, cache: dict[int, Scene] | None = None,
    device: str = "cpu", depth: bool = True,
) -> dict:
    """Clip ``index`` of the dataset (seed, scenes), rendered on ``device``; ``cache`` keeps built scenes."""
    s = index % scenes
    scene = cache.get(s) if cache is not None else None
    if scene is None:
        scene = Scene.random(derive_seed(seed, 0, s), config.scene)
        if cache is not None:
            cache[s] = scene
    clip = make_clip(derive_seed(seed, 1, index), config, scene=scene, device=device, depth=depth)
    clip["meta"].update(clip_index=index, scene_index=s)
    return clip


def _job(args: tuple[int, int, int, SyntheticConfig, bool]) -> dict:
    index, scenes, seed, config, depth = args
    return dataset_clip(index, scenes, seed, config, depth=depth)


def iter_dataset_clips(
    num_clips: int, scenes: int, seed: int, config: SyntheticConfig, workers: int = 1, threads: int = 1,
    device: str = "cpu", depth: bool = True,
) -> Iterator[dict]:
    """Clips 0..num_clips-1 in order, generated here or by ``workers`` spawned processes.

    ``device`` other than "cpu" ray casts every clip here on that device (a GPU renders tens of
    thousands of frames per second: one process is enough; ``workers`` must then be 1).

    Each process renders with ``threads`` torch threads. One thread per process is the robust
    default: the renderer's ops are small, and on cores shared with other processes every
    multi-threaded op waits for a descheduled thread (2 threads ran ~10x slower than 1 at load 6
    on 2 cores), whereas processes over clips scale with the cores and degrade gracefully.
    """
    if torch.device(device).type != "cpu" and workers > 1:
        raise ValueError(f"rendering on {device} runs in one process: use workers=1 (got {workers})")
    if workers <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cache: dict[int, Scene] = {}
            for i in range(num_clips):
                yield dataset_clip(i, scenes, seed, config, cache, device=device, depth=depth)
        finally:
            torch.set_num_threads(previous)
        return
    with mp.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        yield from pool.imap(_job, [(i, scenes, seed, config, depth) for i in range(num_clips)])
