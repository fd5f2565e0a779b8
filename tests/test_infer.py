"""The inference module on tiny random bundles (CPU): generation from pose strings and pose JSON,
streaming == CLI == one whole rollout, every bundle kind, timings and sidecar, and clear errors that
leave no output behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from data.actions import MotionSteps, keys_to_action_id
from data.geometry import invert_rigid, make_pose, rotation_y
from data.poseio import pose_string_to_poses
from data.video import VideoError, read_mp4
from infer.__main__ import main, render
from infer.errors import InferError
from infer.image import fit_image, read_image, to_uint8_frames, to_video_tensor
from infer.player import WorldPlayer
from infer.trajectory import (
    WORLDPLAY_K,
    TrajectoryLengthError,
    check_length,
    load_trajectory,
    move_slices,
    normalized_intrinsics,
)
from models.autoencoders import AutoencoderConfig
from models.bundle import CONFIG, WEIGHTS, save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.memory import MemoryConfig
from models.rollout import Rollout, RolloutConfig
from models.text_encoders import TextEncoderConfig, save_precomputed

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

H, W, FPS = 16, 24, 12.0  # video size (aspect 1.5), latent 4x6 with the 4x4x4 patch autoencoder
MEM = MemoryConfig(temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, num_points=500)
POSE = "w-3, right-4, d-4"  # 12 latents = 3 chunks of 4 = 45 frames


def make_bundle(path: Path, *, sampling: dict | None = None, drop: tuple[str, ...] = (),
                text: TextEncoderConfig | None = None, **rollout) -> Path:
    """A tiny random WorldDiT bundle with the 4x4-patch, 4-frame autoencoder (192 latent channels)."""
    torch.manual_seed(0)
    cfg = replace(preset("tiny"), latent_channels=192)
    model = WorldDiT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the default init zeroes the output layers: make the model do something
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    samp = asdict(RolloutConfig(**{"steps": 2, "memory": MEM, **rollout}))
    samp.update(height=H, width=W, fps=FPS, model_type="ar")
    samp.update(sampling or {})
    for k in drop:
        samp.pop(k)
    return save_bundle(
        path, model, model_cfg=cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4, temporal_patch=4),
        text_encoder_cfg=text or TextEncoderConfig(kind="none", dim=cfg.text_dim), sampling=samp,
        meta={"stage": "pretrain", "step": 7},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:45, 0:80]
    img = np.stack([128 + 90 * np.sin(x / 9.0 + c) * np.cos(y / 7.0) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)  # 80x45: wider than the bundle
    cv2.imwrite(str(root / "start.png"), img[..., ::-1])
    return {"ar": make_bundle(root / "ar"), "image": root / "start.png", "root": root}


@pytest.fixture(scope="module")
def ar_player(files) -> WorldPlayer:
    return WorldPlayer.from_bundle(files["ar"])


def run_cli(tmp_path: Path, files: dict, *extra: str, pose: str = POSE, bundle: Path | None = None,
            image: Path | None = None, out_dir: str = "out") -> tuple[int, Path]:
    out = tmp_path / out_dir / "video.mp4"
    argv = ["--bundle", str(bundle or files["ar"]), "--image", str(image or files["image"]), "--pose", pose,
            "--out", str(out), "--quiet", *extra]
    return main(argv), out


def mp4_fps(path: Path) -> float:
    with av.open(str(path)) as c:
        return float(c.streams.video[0].average_rate)


# --------------------------------------------------------------------------- generation


def test_pose_string_generation_frames_fps_and_sidecar(tmp_path, files):
    rc, out = run_cli(tmp_path, files, "--seed", "3")
    assert rc == 0
    video = read_mp4(out)
    assert video.shape == (45, H, W, 3)  # 12 latents -> 1 + 4 * 11 frames
    assert mp4_fps(out) == pytest.approx(FPS)

    side = json.loads(out.with_suffix(".json").read_text())
    keys, c2w = pose_string_to_poses(POSE, MotionSteps())
    got = torch.tensor([lat["c2w"] for lat in side["latents"]], dtype=torch.float64)
    torch.testing.assert_close(got, c2w, rtol=0, atol=1e-9)
    actions = [lat["action_id"] for lat in side["latents"]]
    assert actions == keys_to_action_id(keys).tolist() == [0] + [9] * 3 + [1] * 4 + [27] * 4  # W, yaw-right, D
    assert side["latents"][5]["keys"] == ["yaw_right"] and side["latents"][0]["frames"] == [0, 0]
    # Per frame: latent 0 holds frame 0, latent i frames 4i-3..4i; poses / actions follow their latent.
    assert side["frames"]["latent"] == [0] + [i for i in range(1, 12) for _ in range(4)]
    assert side["frames"]["action_id"][1:5] == [9] * 4 and side["frames"]["c2w"][44] == side["latents"][11]["c2w"]
    assert side["video"] == {"path": "video.mp4", "frames": 45, "latents": 12, "chunks": 3, "fps": FPS,
                             "height": H, "width": W, "duration_s": 45 / FPS}
    assert side["inputs"]["pose_source"] == "string" and side["settings"]["seed"] == 3
    assert side["settings"]["rollout"]["steps"] == 2 and side["settings"]["video"]["sources"]["fps"] == "bundle"
    assert side["bundle"]["stage"] == "pretrain" and side["bundle"]["step"] == 7

    t = side["timings"]
    assert [c["num_frames"] for c in t["chunks"]] == [13, 16, 16]
    assert [c["context_latents"] for c in t["chunks"]] == [0, 4, 8]  # short histories are used whole
    assert t["load_s"] > 0 and t["reset_s"] > 0 and t["mp4_write_s"] > 0
    assert t["time_to_first_chunk_s"] == pytest.approx(t["reset_s"] + t["chunks"][0]["total_s"])
    lat = t["chunk_latency_s"]
    assert lat["count"] == 3 and lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
    assert lat["median"] == pytest.approx(sorted(c["total_s"] for c in t["chunks"])[1])
    assert t["frames_per_s"] == pytest.approx(45 / t["generation_s"])
    for c in t["chunks"]:
        assert 0 < c["model_s"] and 0 <= c["decode_s"] and c["model_s"] + c["decode_s"] <= c["total_s"] + 1e-9


def write_pose_json(path: Path, c2w: torch.Tensor, K) -> Path:
    path.write_text(json.dumps({str(i): {"extrinsic": c2w[i].tolist(), "K": [list(r) for r in K]} for i in range(len(c2w))}))
    return path


def walk(n: int) -> torch.Tensor:
    """c2w [n, 4, 4]: forward 0.08 per latent for 3 latents, then yaw right 3 deg per latent."""
    poses = [torch.eye(4, dtype=torch.float64)]
    for i in range(1, n):
        step = make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 0.08])) if i < 4 else \
            make_pose(rotation_y(torch.tensor(3.0, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
        poses.append(poses[-1] @ step)
    return torch.stack(poses)


def test_pose_json_generation_uses_its_poses_intrinsics_and_actions(tmp_path, files):
    c2w = walk(8)
    pose = write_pose_json(tmp_path / "walk.json", c2w, WORLDPLAY_K)
    rc, out = run_cli(tmp_path, files, pose=str(pose))
    assert rc == 0
    assert read_mp4(out).shape == (29, H, W, 3)
    side = json.loads(out.with_suffix(".json").read_text())
    torch.testing.assert_close(torch.tensor([lat["c2w"] for lat in side["latents"]], dtype=torch.float64), c2w, rtol=0, atol=1e-9)
    assert [lat["action_id"] for lat in side["latents"]] == [0, 9, 9, 9, 1, 1, 1, 1]
    # WorldPlay's K is for 1920x1080 (16:9). The 3:2 video is its centre crop (1620x1080 from x=150),
    # resized to 24x16: fx = 969.697 * 24/1620 px = 0.5986 of the width, fy = 969.697/1080 of the height.
    K = torch.tensor(side["latents"][3]["K"])
    torch.testing.assert_close(K, torch.tensor([[969.697 / 1620, 0, 0.5], [0, 969.697 / 1080, 0.5], [0, 0, 1]]),
                               rtol=0, atol=1e-6)
    assert side["inputs"]["pose_source"] == "json"


def test_normalized_intrinsics_preserved_when_the_aspect_matches_and_cropped_otherwise():
    K = torch.tensor([[300.0, 0, 120], [0, 280.0, 80], [0, 0, 1]])  # a 240x160 frame (3:2, like the bundle)
    torch.testing.assert_close(normalized_intrinsics(K, 16, 24),
                               torch.tensor([[300 / 240, 0, 0.5], [0, 280 / 160, 0.5], [0, 0, 1]], dtype=torch.float64))
    # The same K for a 48x32 bundle (same aspect) normalises identically: resolution-free.
    torch.testing.assert_close(normalized_intrinsics(K, 32, 48), normalized_intrinsics(K, 16, 24))
    # A square bundle keeps the central 160x160: fx / 160 of the width, fy / 160 of the height.
    torch.testing.assert_close(normalized_intrinsics(K, 8, 8),
                               torch.tensor([[300 / 160, 0, 0.5], [0, 280 / 160, 0.5], [0, 0, 1]], dtype=torch.float64))
    with pytest.raises(InferError, match="positive fx"):
        normalized_intrinsics(torch.zeros(3, 3), 16, 24)


def test_streaming_api_equals_cli_loop_and_one_whole_rollout(files, ar_player):
    """step('w'), step('right'), step('d') == render(pose string) == decode(Rollout.generate(whole trajectory))."""
    player = ar_player
    image = player.reset(files["image"], seed=7)
    assert image.shape == (H, W, 3) and player.moves_needed == 3
    streamed = [player.step("w")]
    assert player.moves_needed == 4
    streamed += [player.step("right"), player.step(np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool))]
    streamed = np.concatenate(streamed)
    assert streamed.shape == (45, H, W, 3) and player.num_frames == 45

    traj = load_trajectory(POSE, height=H, width=W)
    torch.testing.assert_close(player.poses, traj.c2w, rtol=0, atol=1e-9)
    assert torch.equal(player.actions, traj.actions)
    cli = render(player, traj, files["image"], seed=7)  # the loop python -m infer runs
    assert np.array_equal(cli, streamed)

    ae, model = player.bundle.autoencoder, player.bundle.model
    z = ae.encode(to_video_tensor(fit_image(read_image(files["image"]), H, W)))[:, :, 0]
    with torch.no_grad():
        res = Rollout(model, player.rollout_cfg).generate(
            z, traj.actions[None], invert_rigid(traj.c2w).float()[None], traj.K.float()[None],
            generator=torch.Generator().manual_seed(7),
        )
        whole = to_uint8_frames(ae.decode(res.latents))
    assert np.array_equal(whole, streamed)
    # Another seed gives another video; the same seed the same one.
    assert not np.array_equal(render(player, traj, files["image"], seed=8), streamed)


def test_step_with_motion_and_absolute_poses_agree(files, ar_player):
    player = ar_player
    player.reset(files["image"], seed=1)
    fwd = make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 0.08]))
    a = player.step(motion=fwd)
    b = player.step(motion=fwd[None].expand(4, 4, 4))
    poses = player.poses
    player.reset(files["image"], seed=1)
    c = player.step(poses=poses[1:4])
    d = player.step(poses=poses[4:8])
    assert np.array_equal(np.concatenate([a, b]), np.concatenate([c, d]))
    assert player.actions.tolist() == [0] + [9] * 7


# --------------------------------------------------------------------------- bundle kinds


def count_denoise_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(module, args, kwargs):
        if kwargs.get("fill") is None:
            calls[0] += 1

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_distilled_bundle_runs_four_steps_with_no_flags(tmp_path, files):
    player = WorldPlayer.from_bundle(make_bundle(tmp_path / "distilled", schedule="distilled", steps=50))
    calls = count_denoise_calls(player.bundle.model)
    player.reset(files["image"])
    frames = np.concatenate([player.step("w"), player.step("a")])
    assert frames.shape == (29, H, W, 3)
    assert player.rollout.num_steps == 4 and calls[0] == 2 * 4  # 4 denoising calls per chunk, no CFG branch
    with pytest.raises(InferError, match="distilled schedule always takes 4 steps"):
        WorldPlayer.from_bundle(tmp_path / "distilled", steps=8)
    assert WorldPlayer.from_bundle(tmp_path / "distilled", steps=3, schedule="euler").rollout.num_steps == 3


def test_guidance_runs_both_branches(tmp_path, files):
    player = WorldPlayer.from_bundle(files["ar"], guidance=3.0)
    calls = count_denoise_calls(player.bundle.model)
    player.reset(files["image"], seed=2)
    guided = player.step("w")
    assert calls[0] == 2 * 2  # 2 steps x (cond + uncond)
    plain = WorldPlayer.from_bundle(files["ar"])
    plain.reset(files["image"], seed=2)
    assert not np.array_equal(plain.step("w"), guided)


def test_prompts_condition_the_video_and_can_switch_mid_stream(tmp_path, files):
    g = torch.Generator().manual_seed(0)
    emb = save_precomputed(tmp_path / "text.safetensors", {"a red door": torch.randn(5, 32, generator=g),
                                                          "a blue sky": torch.randn(3, 32, generator=g)})
    player = WorldPlayer.from_bundle(make_bundle(tmp_path / "text", text=TextEncoderConfig(kind="precomputed", path=str(emb))))
    first = {}
    for prompt in (None, "a red door", "a blue sky"):
        player.reset(files["image"], prompt, seed=0)
        first[prompt] = player.step("w")
    assert not np.array_equal(first[None], first["a red door"]) and not np.array_equal(first["a red door"], first["a blue sky"])
    later = []
    for switch in (False, True):
        player.reset(files["image"], "a red door", seed=0)
        assert np.array_equal(player.step("w"), first["a red door"])
        if switch:
            player.set_prompt("a blue sky")
        later.append(player.step("w"))
    assert not np.array_equal(later[0], later[1])  # the new prompt reaches the next chunk
    assert player.settings()["prompt"] == "a blue sky"
    with pytest.raises(InferError, match="cannot encode it"):
        player.reset(files["image"], "an unseen prompt")


def test_window_mode_bundle_and_bidirectional_model_type(tmp_path, files):
    path = make_bundle(tmp_path / "bi", mode="window", window_latents=8, sampling={"model_type": "bidirectional"})
    rc, out = run_cli(tmp_path, files, pose="w-7, d-8", bundle=path)
    assert rc == 0 and read_mp4(out).shape == (61, H, W, 3)  # 16 latents = 2 windows of 8
    side = json.loads(out.with_suffix(".json").read_text())
    assert [c["num_latents"] for c in side["timings"]["chunks"]] == [8, 8]
    rc, _ = run_cli(tmp_path, files, pose="w-11", bundle=path)  # 12 latents: not a multiple of 8
    assert rc == 2
    # A bidirectional model whose sampling section says "ar" is run in window mode, with a warning.
    legacy = make_bundle(tmp_path / "bi_ar", window_latents=8, sampling={"model_type": "bidirectional"})
    with pytest.warns(UserWarning, match="window mode"):
        player = WorldPlayer.from_bundle(legacy)
    assert player.rollout_cfg.mode == "window" and player.unit == 8


def test_bf16_and_offload(files):
    fp32 = WorldPlayer.from_bundle(files["ar"])
    bf16 = WorldPlayer.from_bundle(files["ar"], dtype="bf16", offload=True)
    assert next(bf16.bundle.model.parameters()).dtype == torch.bfloat16
    outs = []
    for p in (fp32, bf16):
        p.reset(files["image"], seed=5)
        outs.append(np.concatenate([p.step("w"), p.step("s")]).astype(np.float64))
    assert outs[1].shape == (29, H, W, 3)
    diff = np.abs(outs[0] - outs[1]).mean()
    assert 0 < diff < 2.0  # bf16 rounding changes the pixels, slightly (measured ~0.14 / 255)
    assert all(t.device.type == "cpu" for t in bf16.bundle.autoencoder.buffers())


# --------------------------------------------------------------------------- errors


def assert_failed_cleanly(rc: int, out: Path, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no partial or temporary file
    return err


def test_missing_and_unreadable_image(tmp_path, files, capsys):
    rc, out = run_cli(tmp_path, files, image=tmp_path / "nope.png")
    assert_failed_cleanly(rc, out, capsys, "nope.png", "file not found")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, out = run_cli(tmp_path, files, image=bad)
    assert_failed_cleanly(rc, out, capsys, "bad.png", "not a readable image")


def test_malformed_pose_inputs(tmp_path, files, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"0": {"extrinsic": [[1, 0')
    rc, out = run_cli(tmp_path, files, pose=str(broken))
    assert_failed_cleanly(rc, out, capsys, "broken.json", "not a readable pose JSON")

    c2w = walk(4)
    no_k = tmp_path / "no_k.json"
    no_k.write_text(json.dumps({str(i): {"extrinsic": c2w[i].tolist()} for i in range(4)}))
    rc, out = run_cli(tmp_path, files, pose=str(no_k))
    assert_failed_cleanly(rc, out, capsys, "entry '0' lacks key 'K'")

    skewed = c2w.clone()
    skewed[2, 0, 0] = 1.5  # not a rotation
    rc, out = run_cli(tmp_path, files, pose=str(write_pose_json(tmp_path / "skew.json", skewed, WORLDPLAY_K)))
    assert_failed_cleanly(rc, out, capsys, "entry '2' key 'extrinsic' is not a rigid transform")

    rc, out = run_cli(tmp_path, files, pose=str(tmp_path / "missing.json"))
    assert_failed_cleanly(rc, out, capsys, "missing.json", "not found")
    rc, out = run_cli(tmp_path, files, pose="w-3, jump-2")
    assert_failed_cleanly(rc, out, capsys, "unknown move 'jump'")


def test_impossible_length_lists_valid_lengths(tmp_path, files, capsys):
    rc, out = run_cli(tmp_path, files, pose="w-5")  # 6 latents; chunks of 4
    err = assert_failed_cleanly(rc, out, capsys, "has 6 latents (21 frames)", "multiple of 4")
    assert "4 latents = 13 frames (3 pose-string moves)" in err and "8 latents = 29 frames (7 pose-string moves)" in err
    with pytest.raises(TrajectoryLengthError, match="12 latents = 45 frames"):
        check_length(10, 4, "ar", 4)
    check_length(12, 4, "ar", 4)
    assert move_slices(12, 4) == [slice(1, 4), slice(4, 8), slice(8, 12)]


def test_bundle_with_a_missing_file(tmp_path, files, capsys):
    for name in (WEIGHTS, CONFIG):
        broken = tmp_path / f"no_{name}"
        shutil.copytree(files["ar"], broken)
        (broken / name).unlink()
        rc, out = run_cli(tmp_path, files, bundle=broken)
        assert_failed_cleanly(rc, out, capsys, f"missing file {name}")
    rc, out = run_cli(tmp_path, files, bundle=tmp_path / "no_such_bundle")
    assert_failed_cleanly(rc, out, capsys, "no_such_bundle", "not a directory")


def test_bundle_without_resolution_needs_height_and_width(tmp_path, files, capsys):
    path = make_bundle(tmp_path / "nosize", drop=("height", "width", "fps"))
    rc, out = run_cli(tmp_path, files, bundle=path)
    assert_failed_cleanly(rc, out, capsys, "sampling.height", "--height")
    rc, out = run_cli(tmp_path, files, "--height", "16", "--width", "24", bundle=path, pose="w-3")
    assert rc == 0 and read_mp4(out).shape == (13, H, W, 3)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["video"]["fps"] == 16.0 and side["settings"]["video"]["sources"]["fps"] == "default"
    bad = make_bundle(tmp_path / "typo", sampling={"stepz": 3})
    rc, out = run_cli(tmp_path, files, bundle=bad, out_dir="typo_out")
    assert_failed_cleanly(rc, out, capsys, "unknown keys ['stepz']")


def test_failure_while_writing_leaves_no_partial_output(tmp_path, files, monkeypatch, capsys):
    def broken_write(path, frames, fps=16.0, **kw):
        Path(path).write_bytes(b"\x00" * 100)  # a partial file, then the encoder fails
        raise VideoError(str(path), "disk full")

    monkeypatch.setattr("infer.sidecar.write_mp4", broken_write)
    rc, out = run_cli(tmp_path, files, pose="w-3")
    assert_failed_cleanly(rc, out, capsys, "disk full")


def test_streaming_api_errors(files, ar_player):
    fresh = WorldPlayer(ar_player.bundle, ar_player.cfg)
    with pytest.raises(InferError, match="call reset"):
        fresh.step("w")
    player = ar_player
    player.reset(files["image"])
    with pytest.raises(InferError, match=r"keys must be \[8\] or \[3, 8\]"):
        player.step(np.zeros((4, 8), dtype=bool))
    with pytest.raises(InferError, match="has 2 moves, this step takes 3"):
        player.step("w-2")
    with pytest.raises(InferError, match="one of keys, motion or poses"):
        player.step("w", motion=torch.eye(4))
    shear = torch.eye(4)
    shear[0, 1] = 0.3
    with pytest.raises(InferError, match=r"motion\[0\] is not a rigid transform"):
        player.step(motion=shear)
    with pytest.raises(InferError, match="pixel intrinsics"):
        player.step("w", K=torch.tensor(WORLDPLAY_K))
    assert player.num_latents == 0  # nothing was committed by the failed calls
    assert player.step("w").shape == (13, H, W, 3)


def test_python_dash_m_infer_reports_errors(tmp_path, files):
    out = tmp_path / "o.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "infer", "--bundle", str(files["ar"]), "--image", str(tmp_path / "none.png"),
         "--pose", "w-3", "--out", str(out)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120,
    )
    assert proc.returncode == 2 and "infer: error: image" in proc.stderr and "none.png" in proc.stderr
    assert not out.exists()
