"""Shared fixtures: small datasets of real synthetic-world renders in the clip contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the suite runs under xdist on 2 cores, tiny shapes: one thread per worker is fastest


def write_render_dataset(out: Path, moves: list[str], size: int = 32, step: tuple[float, float] = (0.02, 0.75), seed: int = 0) -> Path:
    """Shards of clips rendered in seeded synthetic scenes along pose-string trajectories.

    Each pose-string move counts frames here (one key step per frame, ``step`` = (units, degrees)).
    """
    from data.actions import MotionSteps, keys_to_poses
    from data.geometry import make_intrinsics
    from data.poseio import parse_pose_string
    from data.shards import ShardWriter
    from data.synthetic import Scene, render

    K = make_intrinsics(70, size, size)
    with ShardWriter(out, samples_per_shard=8, overwrite=True) as w:
        for c, text in enumerate(moves):
            keys = parse_pose_string(text)
            c2w = keys_to_poses(keys, MotionSteps(*step)).float()
            rgb, _ = render(Scene.random(seed + c), c2w, K, size, size)
            F = c2w.shape[0]
            w.write({"video": rgb.numpy(), "c2w": c2w.numpy(), "K": K.expand(F, 3, 3).numpy().copy(), "keys": keys.numpy(), "caption": "", "meta": {"source": "test", "moves": text}})
    return out


@pytest.fixture(scope="session")
def two_clips(tmp_path_factory) -> Path:
    """Two 33-frame clips (9 latents at stride 4): the over-fitting set."""
    return write_render_dataset(tmp_path_factory.mktemp("two_clips"), ["w-20, right-12", "right-16, w-16"], size=16)


@pytest.fixture(scope="session")
def long_clips(tmp_path_factory) -> Path:
    """Clips of 93 frames (24 latents) that go out and come back: mid-training material."""
    return write_render_dataset(tmp_path_factory.mktemp("long_clips"), ["w-30, right-16, s-30, left-16", "right-24, w-24, left-24, s-20"] * 2, size=16)
