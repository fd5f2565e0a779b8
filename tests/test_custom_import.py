"""Custom data import: a synthetic video with poses in each format round-trips to shards, and each
kind of malformed input raises an error naming the file and the field."""

import json
import math

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("av")

from data.actions import MotionSteps, keys_to_poses  # noqa: E402
from data.custom import (  # noqa: E402
    CustomImportConfig,
    CustomImportError,
    frame_keys_from_poses,
    import_video,
    import_videos,
    main,
)
from data.geometry import invert_rigid, make_pose, rebase_to_first, rotation_x, rotation_y  # noqa: E402
from data.latents import latent_keys_from_frames  # noqa: E402
from data.poseio import write_pose_json  # noqa: E402
from data.shards import iter_clips  # noqa: E402
from data.video import write_mp4  # noqa: E402

F, W, H, FPS = 17, 96, 64, 8.0
K0 = torch.tensor([[80.0, 0, 48], [0, 80.0, 32], [0, 0, 1]], dtype=torch.float64)
# Per-latent key groups (4 frames each): W, W, yaw-right, W+D.
GROUPS = [[0], [0], [4], [0, 2]]


def _trajectory() -> tuple[torch.Tensor, torch.Tensor]:
    """(c2w [F, 4, 4] float64 in an arbitrary world frame, per-frame keys [F, 8])."""
    keys = torch.zeros(F, 8, dtype=torch.bool)
    for g, held in enumerate(GROUPS):
        keys[1 + 4 * g : 5 + 4 * g, held] = True
    origin = make_pose(rotation_y(30.0) @ rotation_x(-10.0), torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    return keys_to_poses(keys, MotionSteps(translation=0.02, rotation_deg=0.75), c2w0=origin), keys


def _video(path) -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.random((H, W * 2, 3)).astype(np.float32), (0, 0), 4)  # smooth: survives H.264
    base = ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)
    frames = np.stack([base[:, i : i + W] for i in range(F)])  # a texture sliding by one pixel per frame
    write_mp4(path, frames, fps=FPS)
    return frames


def _rotvec_quat(R: np.ndarray) -> list[float]:
    """COLMAP quaternion (w, x, y, z) of a rotation matrix, via OpenCV's Rodrigues (independent of data.custom)."""
    rv = cv2.Rodrigues(np.ascontiguousarray(R))[0].ravel()
    theta = float(np.linalg.norm(rv))
    axis = rv / theta if theta > 0 else np.zeros(3)
    return [math.cos(theta / 2), *(math.sin(theta / 2) * axis)]


def _write_poses(fmt: str, path, c2w: torch.Tensor, K: torch.Tensor = K0, cam_size=(W, H), first_number: int = 1):
    if fmt == "per_frame_json":
        path.write_text(json.dumps({str(i): {"w2c": invert_rigid(c2w[i]).tolist(), "intrinsic": K.tolist()} for i in range(len(c2w))}))
    elif fmt == "worldplay_json":
        write_pose_json(path, c2w[::4], K)
    elif fmt == "csv":
        rows = ["frame," + ",".join(f"c{r}{c}" for r in range(4) for c in range(4)) + ",fx,fy,cx,cy"]
        for i in range(len(c2w)):
            vals = [i, *c2w[i].flatten().tolist(), K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()]
            rows.append(",".join(repr(float(v)) if j else str(v) for j, v in enumerate(vals)))
        path.write_text("\n".join(rows) + "\n")
    elif fmt == "colmap":
        path.mkdir(parents=True, exist_ok=True)
        fx, fy, cx, cy = (K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item())
        (path / "cameras.txt").write_text(f"# Camera list\n1 PINHOLE {cam_size[0]} {cam_size[1]} {fx} {fy} {cx} {cy}\n")
        lines = ["# Image list with two lines of data per image:"]
        for i in range(len(c2w)):
            w2c = invert_rigid(c2w[i]).numpy()
            q, t = _rotvec_quat(w2c[:3, :3]), w2c[:3, 3]
            nums = " ".join(repr(float(v)) for v in [*q, *t])
            lines += [f"{i + 1} {nums} 1 frame_{i + first_number:05d}.png", ""]
        (path / "images.txt").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    (root / "videos").mkdir()
    frames = _video(root / "videos" / "walk.mp4")
    c2w, keys = _trajectory()
    return root, frames, c2w, keys


# 96x64 -> 64x48: the centred 85x64 window at left 5 (data.transforms' rule), resized by 64/85 and 48/64.
EXPECTED_K = torch.tensor([[80 * 64 / 85, 0, (48 - 5) * 64 / 85], [0, 80 * 0.75, 32 * 0.75], [0, 0, 1]])


@pytest.mark.parametrize("fmt", ["per_frame_json", "worldplay_json", "csv", "colmap"])
def test_round_trip_each_format(data, fmt, tmp_path):
    root, frames, c2w, keys = data
    poses = tmp_path / "poses"
    poses.mkdir()
    name = {"per_frame_json": "walk.json", "worldplay_json": "walk.json", "csv": "walk.csv", "colmap": "walk"}[fmt]
    _write_poses(fmt, poses / name, c2w)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"walk.mp4": "a sliding texture"}))
    out = tmp_path / "shards"
    summary = import_videos(root / "videos", poses, out, CustomImportConfig(width=64, height=48), caption_file=captions)
    assert summary == {"videos": 1, "clips": 1, "frames": F, "out": str(out)}
    (clip,) = list(iter_clips(out))
    assert clip["video"].shape == (F, 48, 64, 3) and clip["caption"] == "a sliding texture"
    assert clip["meta"]["source"] == "custom" and clip["meta"]["pose_format"] == fmt and clip["meta"]["scene"] == "walk"
    # The frames are the source frames' centred window, resized (H.264 is lossy: compare loosely).
    ref = cv2.resize(frames[5][:, 5:90], (64, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(clip["video"][5].astype(int) - ref).mean() < 12
    expected = rebase_to_first(c2w)
    tol = 2e-3 if fmt == "worldplay_json" else 1e-4  # per-latent poses are interpolated between latents
    np.testing.assert_allclose(np.asarray(clip["c2w"]), expected.numpy(), atol=tol)
    np.testing.assert_allclose(np.asarray(clip["c2w"])[::4], expected[::4].numpy(), atol=1e-4)  # exact at latents
    np.testing.assert_allclose(np.asarray(clip["K"]), EXPECTED_K.expand(F, 3, 3).numpy(), atol=1e-4)
    assert torch.equal(torch.as_tensor(clip["keys"]), keys), "keys derived from poses must be the keys that made them"


def test_colmap_resolution_distortion_and_numbering(data, tmp_path):
    root, frames, c2w, keys = data
    # COLMAP ran on 2x larger images and numbers frames from 0: K is rescaled, order kept.
    _write_poses("colmap", tmp_path / "big", c2w, K=K0 * torch.tensor([[2.0], [2.0], [1.0]]), cam_size=(2 * W, 2 * H), first_number=0)
    (clip,) = import_video(root / "videos" / "walk.mp4", tmp_path / "big")
    np.testing.assert_allclose(clip["K"][0], K0.float().numpy(), atol=1e-4)
    np.testing.assert_allclose(clip["c2w"], rebase_to_first(c2w).float().numpy(), atol=1e-4)
    # A SIMPLE_RADIAL camera: frames are undistorted (they change), K stays the pinhole part.
    d = _write_poses("colmap", tmp_path / "radial", c2w)
    (d / "cameras.txt").write_text(f"1 SIMPLE_RADIAL {W} {H} 80 48 32 -0.3\n")
    (plain,) = import_video(root / "videos" / "walk.mp4", tmp_path / "big")
    (undist,) = import_video(root / "videos" / "walk.mp4", d)
    np.testing.assert_allclose(undist["K"][0], K0.float().numpy(), atol=1e-4)
    expected = cv2.undistort(plain["video"][3], K0.numpy(), np.array([-0.3, 0.0, 0.0, 0.0]))
    moved = np.abs(undist["video"][3].astype(int) - plain["video"][3]).mean()
    assert np.abs(undist["video"][3].astype(int) - expected).mean() < 0.3 * moved, moved


def test_fps_and_clip_splitting(data, tmp_path):
    root, frames, c2w, keys = data
    pose = _write_poses("csv", tmp_path / "walk.csv", c2w)
    (half,) = import_video(root / "videos" / "walk.mp4", pose, CustomImportConfig(fps=FPS / 2))
    assert half["video"].shape[0] == 9 and half["meta"]["fps"] == FPS / 2
    np.testing.assert_allclose(half["c2w"], rebase_to_first(c2w[::2]).float().numpy(), atol=1e-4)
    clips = import_video(root / "videos" / "walk.mp4", pose, CustomImportConfig(clip_frames=9))
    assert [len(c["video"]) for c in clips] == [9, 8] and clips[1]["meta"]["source_frames"] == [9, 16]
    np.testing.assert_allclose(clips[1]["c2w"], rebase_to_first(c2w[9:]).float().numpy(), atol=1e-4)
    with pytest.raises(CustomImportError, match="fps"):
        import_video(root / "videos" / "walk.mp4", pose, CustomImportConfig(fps=FPS * 2))


def test_frame_keys_hold_latent_keys():
    c2w, keys = _trajectory()
    from data.actions import MotionThresholds

    derived = frame_keys_from_poses(c2w, 4, MotionThresholds())
    assert torch.equal(latent_keys_from_frames(derived, 4), latent_keys_from_frames(keys, 4))
    assert not derived[0].any() and derived[1:5, 0].all() and derived[9:13, 4].all() and derived[13:, [0, 2]].all()


def _expect(tmp_path, video, fmt, writer, pattern):
    name = {"per_frame_json": "walk.json", "worldplay_json": "walk.json", "csv": "walk.csv", "colmap": "walk"}[fmt]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    writer(path)
    with pytest.raises(CustomImportError, match=pattern) as err:
        import_video(video, path)
    assert str(path) in str(err.value) or str(video) in str(err.value)
    return err.value


def test_malformed_inputs_raise_named_errors(data, tmp_path):
    root, frames, c2w, keys = data
    video = root / "videos" / "walk.mp4"
    # Frame count: 16 poses for 17 frames.
    e = _expect(tmp_path / "a", video, "per_frame_json", lambda p: _write_poses("per_frame_json", p, c2w[:16]),
                r"has 16 poses but the video walk.mp4 has 17 frames")
    assert e.field == "frames"
    # Non-rigid w2c (a scaled rotation) at frame 5.
    def scaled(p):
        _write_poses("per_frame_json", p, c2w)
        raw = json.loads(p.read_text())
        raw["5"]["w2c"] = (torch.tensor(raw["5"]["w2c"]) * torch.tensor([1.1, 1.1, 1.1, 1.0])[:, None]).tolist()
        p.write_text(json.dumps(raw))
    e = _expect(tmp_path / "b", video, "per_frame_json", scaled, r"frame 5 'w2c': is not a rigid transform")
    # NaN in a CSV pose.
    def nan_csv(p):
        bad = c2w.clone()
        bad[3, 0, 3] = float("nan")
        _write_poses("csv", p, bad)
    _expect(tmp_path / "c", video, "csv", nan_csv, r"frame 3 'c2w': contains NaN")
    # A CSV row with a missing column.
    def short_row(p):
        _write_poses("csv", p, c2w)
        lines = p.read_text().splitlines()
        lines[2] = lines[2].rsplit(",", 1)[0]
        p.write_text("\n".join(lines))
    _expect(tmp_path / "d", video, "csv", short_row, r"row 2: has 20 columns, expected 21")
    # Per-latent JSON whose latents do not cover the video: 4 latents = 13 frames.
    _expect(tmp_path / "e", video, "worldplay_json", lambda p: write_pose_json(p, c2w[:13:4], K0),
            r"4 latents.*13 frames, but the video has 17")
    # NaN in a per-latent JSON.
    def nan_json(p):
        write_pose_json(p, c2w[::4], K0)
        p.write_text(p.read_text().replace("80.0", "NaN", 1))
    _expect(tmp_path / "f", video, "worldplay_json", nan_json, r"latent 0 'K': contains NaN")
    # COLMAP: a frame missing from the reconstruction, and an unsupported camera model.
    def gap(p):
        _write_poses("colmap", p, c2w)
        lines = (p / "images.txt").read_text().splitlines()
        del lines[1 + 2 * 4 : 1 + 2 * 5]  # drop frame_00005
        (p / "images.txt").write_text("\n".join(lines) + "\n")
    _expect(tmp_path / "g", video, "colmap", gap, r"missing frame numbers \[5\]")
    def fisheye(p):
        _write_poses("colmap", p, c2w)
        (p / "cameras.txt").write_text(f"1 OPENCV_FISHEYE {W} {H} 80 80 48 32 0 0 0 0\n")
    _expect(tmp_path / "h", video, "colmap", fisheye, r"cameras.txt: line 1: unsupported camera 'OPENCV_FISHEYE'")


def test_videos_without_poses_are_rejected(data, tmp_path):
    root, *_ = data
    (tmp_path / "poses").mkdir()
    with pytest.raises(CustomImportError, match="cannot be used for camera conditioning"):
        import_videos(root / "videos", tmp_path / "poses", tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()
    with pytest.raises(CustomImportError, match="cannot be used for camera conditioning"):
        import_video(root / "videos" / "walk.mp4", tmp_path / "nothing.json")


def test_cli(data, tmp_path):
    root, frames, c2w, keys = data
    _write_poses("csv", tmp_path / "walk.csv", c2w)
    summary = main(["--videos", str(root / "videos" / "walk.mp4"), "--poses", str(tmp_path / "walk.csv"), "--out", str(tmp_path / "o"),
                    "--size", "48x48", "--video-format", "lossless"])
    assert summary["clips"] == 1
    (clip,) = list(iter_clips(tmp_path / "o"))
    assert clip["video"].shape == (F, 48, 48, 3)
    K = np.asarray(clip["K"])[0]  # 96x64 -> the centred 64x64 window at left 16, resized by 0.75
    np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], [60, 60, 24, 24], atol=1e-4)
    with pytest.raises(SystemExit, match="cannot be used for camera conditioning"):
        main(["--videos", str(root / "videos"), "--poses", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match=r"already holds a dataset.*--overwrite"):  # the CLI flag, not a traceback
        main(["--videos", str(root / "videos" / "walk.mp4"), "--poses", str(tmp_path / "walk.csv"), "--out", str(tmp_path / "o")])
    _write_poses("csv", tmp_path / "walk.csv", c2w[:-1])  # fails while decoding: the old dataset stays as it was
    with pytest.raises(SystemExit, match="has 16 poses"):
        main(["--videos", str(root / "videos" / "walk.mp4"), "--poses", str(tmp_path / "walk.csv"), "--out", str(tmp_path / "o"), "--overwrite"])
    assert len(list(iter_clips(tmp_path / "o"))) == 1 and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []
