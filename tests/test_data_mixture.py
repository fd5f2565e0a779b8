"""Data mixtures: weighted source choice per key, exact resume, clear errors naming the entry."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.actions import MotionSteps, keys_to_poses
from data.geometry import make_intrinsics
from data.poseio import parse_pose_string
from data.shards import ShardWriter
from train.data import DataConfig, MixtureDataset, MixtureSource, build_dataset, build_train_loader


def _write(root, n: int, hw: tuple[int, int], tag: str, seed: int, moves: str = "w-4, right-4, d-4") -> None:
    rng = np.random.default_rng(seed)
    keys = parse_pose_string(moves)  # 13 frames by default
    F = keys.shape[0]
    c2w = keys_to_poses(keys, MotionSteps(0.02, 0.75)).float().numpy()
    H, W = hw
    with ShardWriter(root, samples_per_shard=4) as w:
        for c in range(n):
            w.write({
                "video": rng.integers(0, 255, (F, H, W, 3), dtype=np.uint8),
                "c2w": c2w,
                "K": np.repeat(make_intrinsics(60, W, H).numpy()[None], F, 0),
                "keys": keys.numpy(),
                "caption": f"{tag} {c}",
                "meta": {"source": tag},
            })


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    _write(a, 3, (24, 32), "a", 0)  # different clip sizes: windows are framed to the config size anyway
    _write(b, 5, (32, 32), "b", 1)
    return str(a), str(b)


def _cfg(a: str, b: str, wa: float = 0.25, wb: float = 0.75, **kw) -> DataConfig:
    base = dict(num_latents=2, height=16, width=16, batch_size=2, crop="random")
    base.update(kw)
    return DataConfig(mixture=[MixtureSource(a, wa), MixtureSource(b, wb)], **base)


def test_weights_give_proportions(sources):
    ds = build_dataset(_cfg(*sources), temporal_stride=4, seed=3)
    assert isinstance(ds, MixtureDataset) and len(ds) == 8
    picks = [ds.locate((e, i)) for e in range(50) for i in range(8)]  # 400 draws
    frac_a = sum(s == 0 for s, _ in picks) / len(picks)
    # binomial sd at p=0.25, n=400 is 0.022: +-0.07 is beyond 3 sd
    assert abs(frac_a - 0.25) < 0.07, frac_a
    # every clip of each source gets drawn
    assert {c for s, c in picks if s == 0} == {0, 1, 2} and {c for s, c in picks if s == 1} == set(range(5))
    # the window of a key comes from the clip locate() names, at the config size
    for key in [(0, 0), (1, 5), (7, 3)]:
        s, c = ds.locate(key)
        w = ds[key]
        assert w["caption"] == f"{'ab'[s]} {c}"
        assert w["video"].shape == (3, 5, 16, 16)
    # other weights move the proportion; a source alone gets everything
    ds2 = build_dataset(_cfg(*sources, wa=3.0, wb=1.0), temporal_stride=4, seed=3)
    frac2 = sum(ds2.locate((e, i))[0] == 0 for e in range(50) for i in range(8)) / 400
    assert abs(frac2 - 0.75) < 0.07, frac2


def test_deterministic_and_resumable(sources):
    cfg = _cfg(*sources)
    run = build_train_loader(cfg, temporal_stride=4, seed=5)
    full = [next(run) for _ in range(8)]  # crosses an epoch boundary (4 steps per epoch)
    first = build_train_loader(cfg, temporal_stride=4, seed=5)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    resumed = build_train_loader(cfg, temporal_stride=4, seed=5)
    resumed.load_state_dict(state)
    for want in full[3:]:
        got = next(resumed)
        assert got["caption"] == want["caption"]
        assert torch.equal(got["video"], want["video"]) and torch.equal(got["K"], want["K"])
    # same stream with a DataLoader worker process
    workers = build_train_loader(_cfg(*sources, num_workers=1), temporal_stride=4, seed=5)
    for want in full[:2]:
        got = next(workers)
        assert got["caption"] == want["caption"] and torch.equal(got["video"], want["video"])
    # a different seed gives a different stream
    other = build_train_loader(cfg, temporal_stride=4, seed=6)
    assert [next(other)["caption"] for _ in range(4)] != [b["caption"] for b in full[:4]]


def test_bad_entries_name_the_entry(sources, tmp_path):
    a, b = sources
    with pytest.raises(ValueError, match=r"data\.mixture\[1\].*weight must be a positive finite number, got -1"):
        build_train_loader(_cfg(a, b, wb=-1.0), 4, seed=0)
    with pytest.raises(ValueError, match=r"data\.mixture\[0\].*weight must be a positive finite number, got nan"):
        build_train_loader(_cfg(a, b, wa=float("nan")), 4, seed=0)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"data\.mixture\[1\] \('.*nowhere'\): path does not exist"):
        build_train_loader(_cfg(a, missing), 4, seed=0)
    with pytest.raises(ValueError, match=r"data\.mixture\[0\].*has no index\.json"):
        build_train_loader(_cfg(str(tmp_path), b), 4, seed=0)
    short = tmp_path / "short"
    _write(short, 2, (16, 16), "s", 2, moves="w-4")  # 5 frames < 9-frame windows of 3 latents
    with pytest.raises(ValueError, match=r"data\.mixture\[1\] .*short.*every clip is shorter than a window"):
        build_train_loader(_cfg(a, str(short), num_latents=3), 4, seed=0)
    with pytest.raises(ValueError, match=r"data\.mixture\[0\].*unknown key 'wieght'"):
        build_train_loader(DataConfig(mixture=[{"path": a, "wieght": 1.0}]), 4, seed=0)
    with pytest.raises(ValueError, match="data.path is not set"):
        build_train_loader(DataConfig(), 4, seed=0)


def test_override_syntax_builds_typed_entries(sources):
    a, b = sources
    node = OmegaConf.merge(OmegaConf.structured(DataConfig),
                           OmegaConf.from_dotlist([f"mixture=[{{path: {a}, weight: 0.5}}, {{path: {b}}}]", "num_latents=2"]))
    cfg = OmegaConf.to_object(node)
    assert cfg.mixture == [MixtureSource(a, 0.5), MixtureSource(b, 1.0)] and cfg.path == ""
    ds = build_dataset(cfg, temporal_stride=4, seed=0)
    assert isinstance(ds, MixtureDataset) and np.allclose(ds.probs, [1 / 3, 2 / 3])
