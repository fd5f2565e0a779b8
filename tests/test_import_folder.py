"""Folder import CLI: an mp4 and an image folder with pose and action JSON round-trip to shards;
keys recorded or derived; scale normalisation; each malformed input names its file and frame."""

import json

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("av")

from data.actions import MotionSteps, keys_to_poses  # noqa: E402
from data.custom import CustomImportError  # noqa: E402
from data.geometry import invert_rigid, make_pose, rebase_to_first, rotation_y  # noqa: E402
from data.import_folder import FolderImportConfig, find_items, import_folder, import_item, main, read_actions, read_frame_poses  # noqa: E402
from data.shards import iter_clips  # noqa: E402
from data.video import write_mp4  # noqa: E402

F, W, H = 9, 48, 32
K0 = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]], dtype=torch.float64)


def _trajectory(scale: float = 1.0):
    """c2w [F, 4, 4] (not starting at identity), keys [F, 8]: W for 4 frames, then yaw-right + A."""
    keys = torch.zeros(F, 8, dtype=torch.bool)
    keys[1:5, 0] = True
    keys[5:9, 3] = keys[5:9, 4] = True
    origin = make_pose(rotation_y(20.0), torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64))
    c2w = keys_to_poses(keys, MotionSteps(translation=0.02 * scale, rotation_deg=0.75), c2w0=origin)
    return c2w, keys


def _frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.random((H, W * 2, 3)).astype(np.float32), (0, 0), 3)
    base = ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)
    return np.stack([base[:, i : i + W] for i in range(F)])


def _actions(keys: torch.Tensor) -> list[dict]:
    out = []
    for k in keys.tolist():
        move = "".join(c for c, on in zip("WSDA", k[:4]) if on)
        view = next((v for v, on in zip(("LR", "LL", "LU", "LD"), k[4:]) if on), "")
        out.append({"move_action": move, "view_action": view})
    return out


@pytest.fixture()
def folder(tmp_path):
    """src/: walk.mp4 + walk.json (WorldPlay w2c) + walk.actions.json; stills/ (PNGs) + stills.poses.json (ours)."""
    src = tmp_path / "src"
    src.mkdir()
    frames = _frames()
    c2w, keys = _trajectory()
    write_mp4(src / "walk.mp4", frames, fps=8.0)
    (src / "walk.json").write_text(json.dumps([{"w2c": invert_rigid(c).tolist(), "intrinsic": K0.tolist()} for c in c2w]))
    (src / "walk.actions.json").write_text(json.dumps(_actions(keys)))
    (src / "stills").mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(src / "stills" / f"frame_{i + 1}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))  # 1..9: numeric order
    c2w_big, _ = _trajectory(scale=5.0)
    (src / "stills.poses.json").write_text(json.dumps({str(i): {"c2w": c.tolist(), "K": K0.tolist()} for i, c in enumerate(c2w_big)}))
    (src / "notes.txt").write_text("ignored")
    return src, frames, c2w, keys, c2w_big


def test_cli_round_trip(folder, tmp_path, capsys):
    src, frames, c2w, keys, c2w_big = folder
    summary = main(["--src", str(src), "--out", str(tmp_path / "out"), "--video-format", "lossless"])
    assert summary == {"videos": 2, "clips": 2, "frames": 2 * F, "out": str(tmp_path / "out")}
    clips = {c["meta"]["scene"]: c for c in iter_clips(tmp_path / "out")}
    walk, stills = clips["walk"], clips["stills"]
    # poses reproduced, rebased to the first camera
    assert np.allclose(walk["c2w"], rebase_to_first(c2w).numpy(), atol=1e-5)
    assert np.allclose(stills["c2w"], rebase_to_first(c2w_big).numpy(), atol=1e-5)
    assert np.allclose(walk["K"], K0.numpy()[None], atol=1e-5)
    # recorded keys stored as recorded; derived keys per latent from poses otherwise
    assert np.array_equal(walk["keys"], keys.numpy()) and "recorded" in walk["meta"]["keys"]
    assert stills["keys"][1:5, 0].all() and stills["keys"][5:, 4].all() and stills["keys"][5:, 3].all()
    assert "derived" in stills["meta"]["keys"]
    # PNG frames are lossless and in numeric order (frame_10 would sort before frame_2 by name)
    assert np.array_equal(stills["video"], frames)
    assert np.abs(walk["video"].astype(int) - frames).mean() < 6  # H.264 source


def test_size_fps_and_normalize_scale(folder, tmp_path, capsys):
    src, frames, c2w, keys, c2w_big = folder
    cfg = FolderImportConfig(width=24, height=24, fps=4.0, image_fps=8.0, normalize_scale=True, target_step=0.05)
    items = {it.name: it for it in find_items(src)}
    walk = import_item(items["walk"], cfg)[0]
    stills = import_item(items["stills"], cfg)[0]
    assert walk["video"].shape == (5, 24, 24, 3) and stills["video"].shape == (5, 24, 24, 3)
    # 48x32 -> centred 32x32 -> 24x24: f 40 * 0.75, cx (24 - 8) * 0.75
    assert np.allclose(walk["K"][0], [[30, 0, 12], [0, 30, 12], [0, 0, 1]], atol=1e-4)
    # both scenes end at the same scale although stills moves 5x more per frame
    for clip in (walk, stills):
        steps = np.linalg.norm(np.diff(clip["c2w"][:, :3, 3], axis=0), axis=1)
        assert np.isclose(np.median(steps), 0.05, rtol=1e-3)
    assert np.isclose(stills["meta"]["scale_normalization"]["factor"] * 5, walk["meta"]["scale_normalization"]["factor"], rtol=1e-3)
    assert "translations x" in capsys.readouterr().err
    # keys held over dropped frames survive --fps: kept frame 2 covers frames 1-2 (W)
    assert walk["keys"][1, 0] and walk["keys"][3, 4] and not walk["keys"][0].any()


def _expect(src, out, match):
    with pytest.raises(CustomImportError, match=match):
        import_folder(src, out, overwrite=True)


def test_malformed_inputs_name_file_and_frame(folder, tmp_path):
    src, frames, c2w, keys, c2w_big = folder
    out = tmp_path / "bad"
    poses = json.loads((src / "walk.json").read_text())
    (src / "walk.json").write_text(json.dumps(poses[:-1]))
    _expect(src, out, r"walk\.json: frames: has 8 poses but the video walk\.mp4 has 9 frames")
    bad = [dict(p) for p in poses]
    bad[3]["w2c"] = (2 * torch.tensor(bad[3]["w2c"])).tolist()
    (src / "walk.json").write_text(json.dumps(bad))
    _expect(src, out, r"walk\.json: frame 3 'w2c': is not a rigid transform")
    (src / "walk.json").write_text(json.dumps(poses))
    big = json.loads((src / "stills.poses.json").read_text())
    big["5"]["c2w"][0][3] = float("nan")
    (src / "stills.poses.json").write_text(json.dumps(big).replace("NaN", "NaN"))
    _expect(src, out, r"stills\.poses\.json: frame 5 'c2w': contains NaN")
    big["5"]["c2w"][0][3] = 0.0
    (src / "stills.poses.json").write_text(json.dumps(big))
    acts = _actions(keys)
    acts[2]["view_action"] = "LX"
    (src / "walk.actions.json").write_text(json.dumps(acts))
    _expect(src, out, r"walk\.actions\.json: frame 2 'view_action': must be one of")
    (src / "walk.actions.json").write_text(json.dumps(_actions(keys)[:-2]))
    _expect(src, out, r"walk\.actions\.json: frames: has 7 actions but walk\.mp4 has 9 frames")
    (src / "walk.actions.json").unlink()
    (src / "stills" / "frame_4.png").write_bytes(b"not a png")
    _expect(src, out, r"frame_4\.png: frame 3: cannot be read as an image")
    (src / "stills" / "frame_4.png").unlink()
    _expect(src, out, r"stills: frames: images must be numbered without gaps; missing frame numbers \[4\]")
    (src / "stills" / "frame_4.png").write_bytes((src / "stills" / "frame_5.png").read_bytes())
    (src / "stills" / "frame_10.png").write_bytes((src / "stills" / "frame_5.png").read_bytes())
    _expect(src, out, r"stills\.poses\.json: frames: has 9 poses but the image folder stills has 10 frames")
    (src / "stills" / "frame_10.png").unlink()
    (src / "broken.mp4").write_bytes(b"\x00" * 64)
    (src / "broken.json").write_text(json.dumps(poses))
    _expect(src, out, r"broken\.mp4: video: cannot be opened")
    (src / "broken.json").unlink()
    _expect(src, out, r"broken\.mp4: poses: no broken\.json or broken\.poses\.json")


def test_read_actions_maps_worldplay_keys(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"move_action": "", "view_action": ""}, {"move_action": "wd", "view_action": "LU"},
                             {"move_action": "SA", "view_action": "LD"}, {"move_action": "", "view_action": "LL"}]))
    k = read_actions(p).int().tolist()
    assert k == [[0] * 8, [1, 0, 1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 0, 0]]


def test_frame_keyed_json_is_read_by_key_not_file_order(tmp_path):
    """{"0", "1", "10", "11", "2", ...} (sorted keys) must give frame 2 the pose of key "2", not of key "10"."""
    c2w = torch.eye(4, dtype=torch.float64).repeat(12, 1, 1)
    c2w[:, 2, 3] = torch.arange(12, dtype=torch.float64) * 0.1  # frame i sits at z = 0.1 i
    path = tmp_path / "walk.json"
    entries = {str(i): {"w2c": invert_rigid(c).tolist(), "intrinsic": K0.tolist()} for i, c in enumerate(c2w)}
    path.write_text(json.dumps(entries, sort_keys=True))
    assert list(json.loads(path.read_text()))[:3] == ["0", "1", "10"]
    assert torch.allclose(read_frame_poses(path).c2w[:, 2, 3], c2w[:, 2, 3])
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({str(i): {"c2w": c.tolist(), "K": K0.tolist()} for i, c in enumerate(c2w)}, sort_keys=True))
    assert torch.allclose(read_frame_poses(ours).c2w[:, 2, 3], c2w[:, 2, 3])
    acts = tmp_path / "a.json"
    acts.write_text(json.dumps({str(i): {"move_action": "W" if i == 10 else "", "view_action": ""} for i in range(12)}, sort_keys=True))
    assert read_actions(acts)[:, 0].nonzero().flatten().tolist() == [10]
    # gaps, repeats and non-integer keys are named
    bad = dict(entries)
    del bad["7"]
    path.write_text(json.dumps(bad))
    with pytest.raises(CustomImportError, match=r"walk\.json: key '7': missing: keys must run 0\.\.11 without gaps"):
        read_frame_poses(path)
    path.write_text(json.dumps({**entries, "x": entries["0"]}))
    with pytest.raises(CustomImportError, match=r"walk\.json: key 'x': is not an integer"):
        read_frame_poses(path)
    path.write_text(json.dumps(entries)[:-1] + ', "01": ' + json.dumps(entries["1"]) + "}")
    with pytest.raises(CustomImportError, match=r"walk\.json: key '01': repeats index 1"):
        read_frame_poses(path)
    path.write_text(json.dumps(entries)[:-1] + ', "3": ' + json.dumps(entries["3"]) + "}")
    with pytest.raises(CustomImportError, match=r"walk\.json: key '3': appears twice"):
        read_frame_poses(path)


def test_a_failed_import_leaves_nothing_and_a_rerun_needs_no_overwrite(folder, tmp_path, capsys):
    src, frames, c2w, keys, c2w_big = folder
    out = tmp_path / "data" / "mine"
    (src / "walk.actions.json").unlink()
    poses = json.loads((src / "walk.json").read_text())
    # walk.mp4 sorts first and imports; the next video fails while decoding: nothing may stay behind
    for name, content in (("zero", b""), ("noise", np.random.default_rng(0).bytes(4096)),
                          ("truncated", (src / "walk.mp4").read_bytes()[:600])):
        bad = src / f"x_{name}.mp4"
        bad.write_bytes(content)
        (src / f"x_{name}.json").write_text(json.dumps(poses))
        with pytest.raises(SystemExit, match=f"x_{name}"):
            main(["--src", str(src), "--out", str(out)])
        assert not out.exists() and not list(out.parent.iterdir()), (name, list(out.parent.iterdir()))
        bad.unlink()
        (src / f"x_{name}.json").unlink()
    (src / "walk.json").write_text(json.dumps(poses[:-1]))  # a pose / frame count mismatch
    with pytest.raises(SystemExit, match="has 8 poses"):
        main(["--src", str(src), "--out", str(out)])
    assert not out.exists()
    (src / "walk.json").write_text(json.dumps(poses))
    png = (src / "stills" / "frame_9.png").read_bytes()
    (src / "stills" / "frame_9.png").write_bytes(b"not a png")  # a bad PNG (today: an index.json with 0 samples)
    with pytest.raises(SystemExit, match="frame_9.png"):
        main(["--src", str(src), "--out", str(out)])
    assert not out.exists()
    (src / "stills" / "frame_9.png").write_bytes(png)
    assert main(["--src", str(src), "--out", str(out)])["clips"] == 2  # the rerun: no --overwrite needed
    index = (out / "index.json").read_text()
    with pytest.raises(SystemExit, match="--overwrite"):  # an existing dataset names the CLI flag
        main(["--src", str(src), "--out", str(out)])
    (src / "walk.json").write_text(json.dumps(poses[:-1]))
    with pytest.raises(SystemExit, match="has 8 poses"):  # a failed --overwrite keeps the old dataset
        main(["--src", str(src), "--out", str(out), "--overwrite"])
    assert (out / "index.json").read_text() == index and len(list(iter_clips(out))) == 2


def test_normalised_intrinsics_are_rejected_by_name(tmp_path):
    path = tmp_path / "walk.json"
    Kn = [[0.8, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1]]  # fx/W, fy/H, cx/W, cy/H: not pixels
    path.write_text(json.dumps([{"c2w": torch.eye(4).tolist(), "K": Kn}] * 3))
    with pytest.raises(CustomImportError, match=r"walk\.json: frame 0 'K': looks normalised.*in pixels"):
        read_frame_poses(path)
