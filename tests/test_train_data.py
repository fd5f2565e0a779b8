"""The training data pipeline: windows, intrinsics after crop/resize, exact resume, rank split, errors."""

import numpy as np
import pytest
import torch

from data.actions import MotionSteps, keys_to_poses
from data.geometry import make_intrinsics, project
from data.indexed import ShardDataset
from data.poseio import parse_pose_string
from data.shards import ShardWriter
from data.transforms import crop_resize
from train.data import DataConfig, build_train_loader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    keys = parse_pose_string("w-8, right-4, d-4")  # 17 frames
    F = keys.shape[0]
    c2w = keys_to_poses(keys, MotionSteps(0.02, 0.75)).float().numpy()
    with ShardWriter(root, samples_per_shard=3) as w:
        for c in range(7):
            w.write(
                {
                    "video": rng.integers(0, 255, (F, 48, 64, 3), dtype=np.uint8),
                    "c2w": c2w,
                    "K": np.repeat(make_intrinsics(60, 64, 48).numpy()[None], F, 0),
                    "keys": keys.numpy(),
                    "caption": f"clip {c}",
                    "meta": {"source": "test"},
                }
            )
    return root


def test_shard_dataset_random_access(dataset):
    ds = ShardDataset(dataset)
    assert len(ds) == 7 and ds.frame_counts == [17] * 7
    assert ds[5]["caption"] == "clip 5" and ds[0]["caption"] == "clip 0"
    with pytest.raises(IndexError, match="out of range"):
        ds[7]


def test_window_layout(dataset):
    cfg = DataConfig(path=str(dataset), num_latents=3, height=32, width=32, batch_size=2, window="start")
    b = next(build_train_loader(cfg, temporal_stride=4, seed=0))
    assert b["video"].shape == (2, 3, 9, 32, 32) and b["video"].min() >= -1 and b["video"].max() <= 1
    assert b["c2w"].shape == (2, 3, 4, 4) and b["K"].shape == (2, 3, 3, 3)
    assert torch.allclose(b["c2w"][:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-6)  # rebased
    assert torch.allclose(b["w2c"] @ b["c2w"], torch.eye(4).expand(2, 3, 4, 4), atol=1e-5)
    assert b["actions"][0].tolist() == [0, 9, 9]  # W held over the first 8 frames
    # 64x48 centre-cropped to 48x48 then resized to 32x32: focal 2/3 of the original
    K0 = make_intrinsics(60, 64, 48)
    assert torch.allclose(b["K_pixels"][0, 0, 0, 0], K0[0, 0] * 32 / 48)
    assert torch.allclose(b["K"][0, 0, 0, 2], torch.tensor(0.5))


def test_crop_resize_keeps_points_in_place():
    K = make_intrinsics(70, 80, 40).double()
    video = np.zeros((1, 40, 80, 3), np.uint8)
    pts = torch.tensor([[0.2, 0.1, 3.0]], dtype=torch.float64)
    uv, _ = project(K, torch.eye(4, dtype=torch.float64), pts)
    for rng in (None, np.random.default_rng(3)):
        _, K2 = crop_resize(video, K[None].numpy(), 20, 20, rng)
        uv2, _ = project(K2[0], torch.eye(4, dtype=torch.float64), pts)
        # the crop is 40x40 out of 80x40 at some column offset, then halved
        left = (uv[0, 0] - uv2[0, 0] * 2).item()
        assert 0 <= left <= 40 and abs(left - round(left)) < 1e-9
        assert abs(uv2[0, 1].item() * 2 - uv[0, 1].item()) < 1e-9


def test_resume_gives_the_same_batches(dataset):
    cfg = DataConfig(path=str(dataset), num_latents=3, height=16, width=16, batch_size=2, crop="random")
    ref = build_train_loader(cfg, 4, seed=7)
    batches = [next(ref) for _ in range(7)]  # crosses an epoch boundary (3 batches per epoch)
    part = build_train_loader(cfg, 4, seed=7)
    for _ in range(4):
        next(part)
    resumed = build_train_loader(cfg, 4, seed=7)
    resumed.load_state_dict(part.state_dict())
    for b in batches[4:]:
        got = next(resumed)
        assert torch.equal(got["video"], b["video"]) and got["key"] == b["key"]
    # epochs reshuffle
    assert [batches[i]["key"] for i in range(3)] != [batches[i]["key"] for i in range(3, 6)]


def test_workers_do_not_change_batches(dataset):
    cfg = DataConfig(path=str(dataset), num_latents=3, height=16, width=16, batch_size=2, crop="random")
    a = build_train_loader(cfg, 4, seed=1)
    cfg_w = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    b = build_train_loader(cfg_w, 4, seed=1)
    for _ in range(3):
        assert torch.equal(next(a)["video"], next(b)["video"])


def test_ranks_take_disjoint_samples(dataset):
    cfg = DataConfig(path=str(dataset), num_latents=3, height=16, width=16, batch_size=1)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, 4, seed=0, rank=rank, world=2)
        seen += [next(loader)["key"][0] for _ in range(3)]
    assert len(seen) == len(set(seen)) == 6


def test_missing_or_short_data_fails_clearly(dataset, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path)):
        build_train_loader(DataConfig(path=str(tmp_path)), 4, seed=0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        build_train_loader(DataConfig(path=str(dataset), num_latents=3, batch_size=8), 4, seed=0)
    with pytest.raises(ValueError, match="shorter than a window"):
        build_train_loader(DataConfig(path=str(dataset), num_latents=9), 4, seed=0)
