"""Webdataset shards: exact lossless round trips, mp4 within tolerance, the index, atomic writes,
named errors for every malformed sample, and DataLoader / rank splitting that reads each sample once."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.contract import ClipError
from data.geometry import make_intrinsics, make_pose, rotation_y
from data.shards import ShardError, ShardSettings, ShardWriter, decode_sample, encode_sample, iter_clips, read_index

MP4_MAE = 3.0  # mean absolute error bound (of 255) for H.264 crf 18 on smooth frames, as in test_video


def make_clip(i: int, F: int = 5, H: int = 16, W: int = 24, depth: bool = False) -> dict:
    """A valid clip whose content depends on ``i`` (smooth frames, turning and walking camera)."""
    f, y, x, c = np.meshgrid(np.arange(F), np.arange(H) / H, np.arange(W) / W, np.arange(3), indexing="ij")
    video = (128 + 50 * np.sin(2 * np.pi * (0.3 * x + 0.2 * y + 0.02 * f) + 0.8 * c + i)).round().astype(np.uint8)
    yaw = torch.arange(F, dtype=torch.float64) * (3.0 + i)
    t = torch.stack([0.1 * torch.arange(F), torch.zeros(F), 0.2 * torch.arange(F) + i], -1)
    clip = {
        "video": video,
        "c2w": make_pose(rotation_y(yaw), t).float().numpy(),
        "K": np.repeat(make_intrinsics(70.0 + i, W, H).numpy()[None], F, 0),
        "keys": np.random.default_rng(i).random((F, 8)) < 0.3,
        "caption": f"clip {i} — ünïcode",
        "meta": {"source": "test", "scene": i, "fps": np.float32(16.0), "tags": ["a", "b"]},
    }
    if depth:
        clip["depth"] = (1.0 + np.random.default_rng(i).random((F, H, W)) * 50).astype(np.float32)
    return clip


def write_dataset(root: Path, clips: list[dict], **kw) -> list[str]:
    with ShardWriter(root, **kw) as w:
        return [w.write(c) for c in clips]


def test_lossless_round_trip_is_bit_identical(tmp_path):
    clips = [make_clip(i, F=3 + i, H=16 + 2 * i, W=24, depth=True) for i in range(4)]
    keys = write_dataset(tmp_path, clips, samples_per_shard=3, depth_dtype="float32")
    out = list(iter_clips(tmp_path))
    assert [c["__key__"] for c in out] == keys and len(set(keys)) == 4
    for src, got in zip(clips, out):
        for k in ("video", "c2w", "K", "keys", "depth"):
            assert got[k].dtype == src[k].dtype and got[k].shape == src[k].shape, k
            np.testing.assert_array_equal(got[k], src[k], err_msg=k)
        assert got["caption"] == src["caption"]
        assert got["meta"] == {"source": "test", "scene": src["meta"]["scene"], "fps": 16.0, "tags": ["a", "b"]}
        assert Path(got["__shard__"]).parent == tmp_path


def test_depth_float16_default_rounds_and_rejects_overflow(tmp_path):
    clip = make_clip(0, depth=True)
    write_dataset(tmp_path / "ds", [clip])
    (got,) = list(iter_clips(tmp_path / "ds"))
    assert got["depth"].dtype == np.float32
    np.testing.assert_array_equal(got["depth"], clip["depth"].astype(np.float16).astype(np.float32))
    clip["depth"][0, 0, 0] = 1e6
    with ShardWriter(tmp_path / "big") as w, pytest.raises(ClipError, match="depth.*overflows float16"):
        w.write(clip)


def test_mp4_round_trip_within_tolerance_and_same_dict(tmp_path):
    clips = [make_clip(i, F=6, H=32, W=48, depth=True) for i in range(3)]
    write_dataset(tmp_path / "mp4", clips, video_format="mp4", samples_per_shard=2)
    write_dataset(tmp_path / "png", clips, video_format="lossless", samples_per_shard=2)
    mp4, png = list(iter_clips(tmp_path / "mp4")), list(iter_clips(tmp_path / "png"))
    for src, a, b in zip(clips, mp4, png):
        assert a.keys() == b.keys()
        assert {k: (v.dtype, v.shape) for k, v in a.items() if isinstance(v, np.ndarray)} == {
            k: (v.dtype, v.shape) for k, v in b.items() if isinstance(v, np.ndarray)}
        assert np.abs(a["video"].astype(int) - src["video"]).mean() < MP4_MAE
        for k in ("c2w", "K", "keys"):
            np.testing.assert_array_equal(a[k], src[k])
    assert read_index(tmp_path / "mp4").video_format == "mp4"


def test_index_records_shards_samples_and_settings(tmp_path):
    sizes = [(3, 16, 24), (4, 18, 20), (5, 16, 24), (6, 8, 8), (7, 16, 24), (3, 10, 12), (4, 16, 24)]
    clips = [make_clip(i, F, H, W) for i, (F, H, W) in enumerate(sizes)]
    keys = write_dataset(tmp_path, clips, prefix="doom", samples_per_shard=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doom-000000.tar", "doom-000001.tar", "doom-000002.tar", "index.json"]
    idx = read_index(tmp_path)
    assert [s.num_samples for s in idx.shards] == [3, 3, 1]
    assert [s.name for s in idx.shards] == ["doom-000000.tar", "doom-000001.tar", "doom-000002.tar"]
    assert [k for s in idx.shards for k in s.keys] == keys
    assert [(f, h, w) for s in idx.shards for f, h, w in zip(s.frames, s.heights, s.widths)] == sizes
    assert idx.num_samples == 7 and idx.num_frames == sum(F for F, _, _ in sizes)
    assert idx.video_format == "lossless" and idx.settings["samples_per_shard"] == 3 and idx.settings["prefix"] == "doom"
    assert [s.num_bytes for s in idx.shards] == [(tmp_path / s.name).stat().st_size for s in idx.shards]
    raw = json.loads((tmp_path / "index.json").read_text())
    assert raw["num_samples"] == 7 and raw["num_shards"] == 3 and raw["version"] == 1


def test_writer_validates_first_and_refuses_to_mix_datasets(tmp_path):
    bad = make_clip(1)
    bad["K"] = bad["K"][:-1]
    with ShardWriter(tmp_path) as w:
        w.write(make_clip(0))
        with pytest.raises(ClipError, match=r"clips-000000\.tar:clips-00000001: key 'K'"):
            w.write(bad)
        w.write(make_clip(2))  # the rejected clip left nothing behind
    assert read_index(tmp_path).num_samples == 2
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(tmp_path)
    write_dataset(tmp_path, [make_clip(5)], overwrite=True)
    assert [c["caption"] for c in iter_clips(tmp_path)] == [make_clip(5)["caption"]]
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path / "x", prefix="a.b")


def test_writes_are_atomic(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, samples_per_shard=3)
    keys = [w.write(make_clip(i)) for i in range(4)]  # one finished shard, one still open
    # The open shard exists only as a hidden temporary: nothing under a shard name is partial.
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["clips-000000.tar"]
    with pytest.raises(FileNotFoundError, match="writer was not closed"):
        read_index(tmp_path)
    assert [c["__key__"] for c in iter_clips(tmp_path / "clips-000000.tar")] == keys[:3]
    # A write that fails inside the tar drops the open shard instead of publishing half of it.
    monkeypatch.setattr(tarfile.TarFile, "addfile", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        w.write(make_clip(4))
    monkeypatch.undo()
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips-000000.tar", "index.json"]
    assert read_index(tmp_path).num_samples == 3


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards found in .*empty"):
        read_index(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no shards found in .*empty"):
        iter_clips(tmp_path / "empty")
    with ShardWriter(tmp_path / "none"):
        pass
    with pytest.raises(ValueError, match="no shards found in .*none"):
        read_index(tmp_path / "none")
    write_dataset(tmp_path / "cut", [make_clip(0), make_clip(1)])
    shard = tmp_path / "cut" / "clips-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"clips-000000\.tar.*bytes on disk.*truncated"):
        read_index(tmp_path / "cut")
    with pytest.raises(ShardError, match=r"clips-000000\.tar.*truncated"):
        list(iter_clips(shard))


def test_damaged_tar_header_raises_shard_error(tmp_path):
    write_dataset(tmp_path, [make_clip(0), make_clip(1)])
    shard = tmp_path / "clips-000000.tar"
    data = bytearray(shard.read_bytes())
    data[:512] = b"\xff" * 512  # the first member's header (size kept: the index check passes)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"clips-000000\.tar: entry '<tar>': unreadable tar"):
        list(iter_clips(tmp_path))


def _raw(clip: dict, video_format: str) -> dict:
    raw = encode_sample(clip, ShardSettings(video_format=video_format))
    raw.update(__key__="clips-00000007", __url__="/data/set/clips-000003.tar")
    return raw


def _non_rigid(raw: dict) -> None:
    c2w = np.load(io.BytesIO(raw["c2w.npy"]))
    c2w[2, :3, :3] *= 1.5  # a scaled "rotation"
    buf = io.BytesIO()
    np.save(buf, c2w)
    raw["c2w.npy"] = buf.getvalue()


def _nan_K(raw: dict) -> None:
    K = np.load(io.BytesIO(raw["intrinsics.npy"]))
    K[1, 0, 2] = np.nan
    buf = io.BytesIO()
    np.save(buf, K)
    raw["intrinsics.npy"] = buf.getvalue()


def _short_keys(raw: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 8), bool))  # clip has 5 frames
    raw["keys.npy"] = buf.getvalue()


@pytest.mark.parametrize(
    "fmt, tamper, error, entry",
    [
        ("lossless", lambda r: r.pop("c2w.npy"), ClipError, "key 'c2w': missing"),
        ("lossless", lambda r: r.pop("video.png"), ClipError, "key 'video': missing"),
        ("lossless", _short_keys, ClipError, r"key 'keys': expected shape \[5, 8\]"),
        ("lossless", _non_rigid, ClipError, "key 'c2w': frame 2 is not a rigid"),
        ("lossless", _nan_K, ClipError, "key 'K': contains NaN"),
        ("lossless", lambda r: r.update({"video.png": b"\x89PNG garbage"}), ShardError, "entry 'video.png': cannot decode"),
        ("mp4", lambda r: r.update({"video.mp4": r["video.mp4"][: len(r["video.mp4"]) // 2]}), ShardError, "entry 'video.mp4'"),
        ("lossless", lambda r: r.update({"keys.npy": b"NUMPY?"}), ShardError, "entry 'keys.npy': not a valid .npy"),
        ("lossless", lambda r: r.update({"meta.json": b"{oops"}), ShardError, "entry 'meta.json': not valid"),
    ],
)
def test_malformed_samples_raise_errors_naming_shard_and_key(fmt, tamper, error, entry):
    raw = _raw(make_clip(0), video_format=fmt)
    decode_sample(dict(raw))  # intact, it decodes
    tamper(raw)
    with pytest.raises(error, match=rf"^clips-000003\.tar:clips-00000007: {entry}"):
        decode_sample(raw)


def test_malformed_sample_inside_a_shard_is_reported_by_the_pipeline(tmp_path):
    raw = _raw(make_clip(0), video_format="lossless")
    _non_rigid(raw)
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        for suffix, data in raw.items():
            if not suffix.startswith("__"):
                ti = tarfile.TarInfo(f"sample-42.{suffix}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(ClipError, match=r"bad-000000\.tar:sample-42: key 'c2w'"):
        list(iter_clips(tmp_path / "bad-000000.tar"))


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    root = tmp_path_factory.mktemp("twelve")
    keys = write_dataset(root, [make_clip(i, F=2, H=8, W=8) for i in range(12)], samples_per_shard=3)
    return root, keys


def test_dataloader_with_two_workers_reads_every_sample_once(twelve):
    root, keys = twelve
    loader = DataLoader(iter_clips(root), batch_size=None, num_workers=2)
    seen = [c["__key__"] for c in loader]
    assert sorted(seen) == sorted(keys) and len(seen) == len(keys)


def test_shuffle_is_deterministic_per_seed_and_epoch(twelve):
    root, keys = twelve

    def order(seed: int, epoch: int = 0) -> list[str]:
        stream = iter_clips(root, shuffle_buffer=4, seed=seed)
        stream.set_epoch(epoch)
        return [c["__key__"] for c in stream]

    assert [c["__key__"] for c in iter_clips(root)] == keys  # no shuffle: index order
    a = order(0)
    assert sorted(a) == sorted(keys) and a != keys
    assert order(0) == a
    assert order(1) != a and order(0, epoch=1) != a


def test_split_by_node_gives_disjoint_rank_slices(twelve, monkeypatch):
    root, keys = twelve
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append([c["__key__"] for c in iter_clips(root, split_by_node=True, shuffle_buffer=2, seed=3)])
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(ValueError, match="4 shards cannot be split over 5 ranks"):
        list(iter_clips(root, split_by_node=True))
