"""Evaluation protocols, reports and the training hook, on synthetic-world renders and tiny random bundles.

A perfect generator (the true renders) must score perfectly in every protocol, so frame/latent
bookkeeping errors show up as lost PSNR; a video with a wrong turn must lose exactly its wrong
steps; a report comparing two bundles must write every file it lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.actions import MotionSteps, MotionThresholds, action_id_to_keys, keys_to_action_id, keys_to_poses, poses_to_keys
from data.geometry import camera_center, camera_forward, make_intrinsics, make_pose, rebase_to_first, rotation_y
from data.latents import num_frames
from data.poseio import parse_pose_string
from data.shards import ShardWriter
from data.synthetic import Scene, render
from eval.lpips import LPIPS, LPIPSConfig
from eval.protocols import (
    ProtocolConfig,
    VideoModel,
    WalkConfig,
    evaluate,
    load_clips,
    parse_protocols,
    prepare_clips,
    settings_from_sampling,
)
from eval.protocols.clips import fit_frames, prepare_clip
from eval.protocols.runner import Request
from eval.protocols.scoring import action_scores
from eval.protocols.walks import out_and_back, plan_path, random_walk
from models.autoencoders import AutoencoderConfig, PatchAutoencoder
from models.bundle import save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.memory import MemoryConfig
from models.rollout import RolloutConfig
from models.text_encoders import TextEncoderConfig
from model_helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

S = 32  # frame size of clips and bundles
STRIDE = 2  # patch autoencoder temporal group: 3 * 4 * 4 * 2 = 96 latent channels
SAMPLING = {"chunk_size": 4, "steps": 2, "shift": 3.0, "height": S, "width": S,
            "memory": {"chunk_size": 4, "temporal_latents": 4, "spatial_chunks": 1, "max_context": 12}}
FAST = dict(num=2, short_latents=8, long_latents=8, action_latents=8)


def free_start(scene: Scene, yaw: float = 30.0) -> torch.Tensor:
    """A level camera pose at eye height with 0.8 units of clearance."""
    for x in np.linspace(-2, 2, 9):
        for z in np.linspace(-2, 2, 9):
            p = torch.tensor([x, -1.4, z], dtype=torch.float64)
            if bool(scene.free(p, 0.8)):
                return make_pose(rotation_y(yaw), p)
    raise AssertionError("no free start")


def write_clips(out: Path, seeds: list[int], moves: list[str], meta_seed: list[int] | None = None) -> Path:
    """Clips rendered in scenes ``seeds`` along per-frame pose strings (0.04 u / 1.5 deg per frame)."""
    K = make_intrinsics(90, S, S)
    with ShardWriter(out, samples_per_shard=8, overwrite=True) as w:
        for c, (seed, text) in enumerate(zip(seeds, moves)):
            scene = Scene.random(seed)
            keys = parse_pose_string(text)
            c2w = keys_to_poses(keys, MotionSteps(0.04, 1.5), free_start(scene)).float()
            rgb, _ = render(scene, c2w, K, S, S)
            F = c2w.shape[0]
            tag = seed if meta_seed is None else meta_seed[c]
            w.write({"video": rgb.numpy(), "c2w": c2w.numpy(), "K": K.expand(F, 3, 3).numpy().copy(), "keys": keys.numpy(),
                     "caption": "", "meta": {"source": "synthetic", "scene_seed": tag}})
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("eval_data"), [3, 5], ["w-8, right-8", "right-8, w-8"])


def tiny_model(seed: int) -> tuple[WorldDiT, object]:
    """A tiny WorldDiT with non-trivial random weights (the default init zeroes its outputs)."""
    cfg = replace(preset("tiny"), latent_channels=96, text_dim=0)
    return randomize(WorldDiT(cfg), seed).eval(), cfg


def save_tiny_bundle(path: Path, seed: int) -> Path:
    model, cfg = tiny_model(seed)
    return save_bundle(path, model, model_cfg=cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4, temporal_patch=STRIDE),
                       text_encoder_cfg=TextEncoderConfig(kind="none"), sampling=SAMPLING,
                       meta={"stage": "test", "step": seed, "data": {"num_latents": 4}}, overwrite=True)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bundles")
    return [save_tiny_bundle(root / "run_a" / "bundle", 1), save_tiny_bundle(root / "run_b" / "bundle", 2)]


class PerClip:
    """For test generators that override ``generate``: the protocols' batched calls go through it."""

    def generate_many(self, requests, batch=8):
        return [self.generate(r.image, r.c2w, r.K, r.caption, r.seed) for r in requests]


class TruthModel(PerClip, VideoModel):
    """A perfect generator: the true render of every latent pose, each held for its group's frames.

    It finds the scene by re-rendering the first pose of the path it is given and matching the image.
    """

    def __init__(self, base: VideoModel, clips):
        super().__init__(base.model, base.autoencoder, base.settings, name="truth")
        self.clips = [c for c in clips if c.scene is not None]

    def generate(self, image, c2w, K, caption=None, seed=0):
        clip = next(c for c in self.clips if np.array_equal(c.render(c2w[:1])[0], image))
        lat = clip.render(c2w)  # [T, H, W, 3]
        groups = [lat[:1]] + [np.repeat(lat[i : i + 1], self.stride, axis=0) for i in range(1, lat.shape[0])]
        return np.concatenate(groups)


# ---------------------------------------------------------------- report and CLI


def test_report_with_two_bundles_renders_all_its_files(bundles, data_dir, tmp_path) -> None:
    from eval.__main__ import main

    out = tmp_path / "report"
    files = main(["--bundle", str(bundles[0]), "--bundle", str(bundles[1]), "--protocol", "all", "--data", str(data_dir),
                  "--out", str(out), "--num", "2", "--short-latents", "8", "--long-latents", "8", "--action-latents", "8"])
    doc = json.loads(files.json.read_text())  # strict JSON: NaN was written as null
    names = [b["name"] for b in doc["bundles"]]
    assert names == ["run_a/bundle", "run_b/bundle"]
    md = files.markdown.read_text()
    for name in names:
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) >= 3  # summary, truth, oracle, bundles
    assert "LPIPS unavailable" in md or "LPIPS v0.1" in md
    listed = doc["plots"] + doc["strips"]
    assert len(doc["plots"]) >= 6 and len(doc["strips"]) == 2 * 5  # short, long, action, control (paths A and B)
    for rel in listed:
        img = cv2.imread(str(out / rel))
        assert img is not None and img.shape[0] > 50 and img.shape[1] > 50, rel
        assert f"]({rel})" in md
    assert sorted(str(p.relative_to(out)) for p in (out / "plots").iterdir()) == sorted(doc["plots"])
    for proto in ("short", "long", "action"):
        assert all(proto in b["protocols"] for b in doc["bundles"])
    # The bundles differ, and so do their rows; every short clip was scored.
    a, b = (x["protocols"]["short"] for x in doc["bundles"])
    assert a["summary"]["num_clips"] == b["summary"]["num_clips"] == 2
    assert a["summary"]["psnr"] != b["summary"]["psnr"]
    # The short strip shows ground truth above generated: its first top frame is the clip's first frame.
    strip = cv2.cvtColor(cv2.imread(str(out / "strips" / "run_a_bundle_short_0.png")), cv2.COLOR_BGR2RGB)
    scale = -(-96 // S)
    first = strip[22 : 22 + S * scale : scale, : S * scale : scale]
    clip0 = load_clips(data_dir, 1)[0][1]["video"][0]
    assert np.array_equal(first, clip0)


def test_report_numbers_are_the_generated_videos_numbers(bundles, data_dir, tmp_path) -> None:
    """Re-generating clip 0 of the short protocol by hand reproduces the per-clip PSNR of the report."""
    from eval.__main__ import evaluate_bundles
    from eval.metrics import psnr

    cfg = ProtocolConfig(**FAST, seed=7)
    files = evaluate_bundles([bundles[0]], data_dir, tmp_path / "r", "short", cfg, log=lambda *_: None)
    row = json.loads(files.json.read_text())["bundles"][0]["protocols"]["short"]["clips"][0]
    vm = VideoModel.from_bundle(bundles[0])
    clip = prepare_clips(load_clips(data_dir, 1), vm, cfg)[0]
    T = 8
    F = num_frames(T, STRIDE)
    idx = torch.arange(T) * STRIDE
    gen = vm.generate(clip.video[0], rebase_to_first(clip.c2w[:F])[idx], clip.K[idx], seed=7)
    want = psnr(torch.from_numpy(gen[1:]), torch.from_numpy(clip.video[1:F])).mean()
    assert row["frames"] == F and row["psnr"] == pytest.approx(float(want), abs=1e-9)


def test_cli_rejects_unknown_protocol(bundles, data_dir, tmp_path) -> None:
    from eval.__main__ import main

    with pytest.raises(SystemExit, match="unknown protocol 'sideways'"):
        main(["--bundle", str(bundles[0]), "--protocol", "sideways", "--data", str(data_dir), "--out", str(tmp_path)])
    assert parse_protocols("all") == ["short", "long", "action", "control"]
    assert parse_protocols("long,short") == ["long", "short"]


# ---------------------------------------------------------------- protocols with a perfect generator


def test_perfect_generator_scores_perfectly_on_the_long_return_path(bundles, data_dir) -> None:
    cfg = ProtocolConfig(**FAST, lpips=LPIPSConfig(allow_random_trunk=True), walk=WalkConfig(segment_min=1, segment_max=3))
    base = VideoModel.from_bundle(bundles[0])
    clips = prepare_clips(load_clips(data_dir, 2), base, cfg)
    assert all(c.scene is not None for c in clips), [c.scene_note for c in clips]
    truth = TruthModel(base, clips)
    lp = LPIPS(cfg.lpips)
    res = evaluate(truth, clips, ["long"], cfg, lp)
    long = res["long"].summary
    # Long: return frames equal outbound frames (identical poses) and the true render exactly.
    assert long["self_psnr"] == cfg.psnr_cap and long["truth_psnr"] == cfg.psnr_cap
    assert long["self_ssim"] == pytest.approx(1.0) and long["truth_ssim"] == pytest.approx(1.0)
    assert long["self_lpips"] == pytest.approx(0.0, abs=1e-6) and long["truth_lpips"] == pytest.approx(0.0, abs=1e-6)
    assert long["num_truth_clips"] == 2
    # Every return latent of the 8-latent path (out 0..3, pause, back 2..0) was compared: 3 per clip.
    assert [c["return_latents"] for c in res["long"].clips] == [3, 3]
    assert res["long"].curves["self_psnr"]["x"] == [10, 12, 14]  # frames of latents 5, 6, 7 at stride 2


def test_control_is_zero_for_a_control_blind_model_and_large_for_the_truth(bundles, data_dir) -> None:
    """A model whose action and camera inputs are cut makes the same video for both paths: control 0 and
    null cost 0, exactly. The true renders score the truths' own separation (cap minus their PSNR)."""
    cfg = ProtocolConfig(**FAST, control_latents=8)
    base = VideoModel.from_bundle(bundles[0])
    clips = prepare_clips(load_clips(data_dir, 2), base, cfg)
    blind_cfg = replace(preset("tiny"), latent_channels=96, text_dim=0, action=False, camera=False)
    blind = VideoModel(randomize(WorldDiT(blind_cfg), 3).eval(), base.autoencoder, base.settings, name="blind")
    res = evaluate(blind, clips, "control", cfg)["control"]
    assert res.summary["num_clips"] == 2
    assert res.summary["control"] == 0.0 and res.summary["null_cost"] == 0.0
    assert all(c["truth_separation"] < 30 for c in res.clips)  # the two paths really differ
    truth = evaluate(TruthModel(base, clips), clips, "control", cfg)["control"]
    for c in truth.clips:
        assert c["control"] == pytest.approx(cfg.psnr_cap - c["truth_separation"]) and c["control"] > 50
    # the protocol's own wrapper cuts the controls of a model that uses them
    seeing = VideoModel.from_bundle(bundles[1])
    res = evaluate(seeing, clips, "control", cfg)["control"]
    assert res.summary["control"] != 0.0 and res.summary["null_cost"] != 0.0


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_clips() -> None:
    from eval.protocols.scoring import bootstrap_interval, summarize

    rng = np.random.default_rng(0)
    few, many = rng.normal(20, 2, 8), rng.normal(20, 2, 128)
    lo8, hi8 = bootstrap_interval(few)
    lo128, hi128 = bootstrap_interval(many)
    assert lo8 < few.mean() < hi8 and lo128 < many.mean() < hi128
    assert (hi128 - lo128) < 0.5 * (hi8 - lo8)  # ~1/sqrt(n): 4x the clips, under half the width
    assert bootstrap_interval([1.0, 2.0]) == bootstrap_interval([1.0, 2.0])  # fixed seed: reproducible
    assert all(math.isnan(v) for v in bootstrap_interval([3.0, float("nan")]))  # one finite value: no interval
    summary, intervals = summarize([{"psnr": 1.0}, {"psnr": 3.0}, {"psnr": float("nan")}], ["psnr"])
    assert summary["psnr"] == 2.0 and intervals["psnr"][0] <= 2.0 <= intervals["psnr"][1]


def test_short_protocol_compares_the_right_frames(bundles, data_dir) -> None:
    """A generator returning the clip itself scores the PSNR cap on every frame: no off-by-one anywhere."""

    class ClipModel(PerClip, VideoModel):
        def __init__(self, base, clips):
            super().__init__(base.model, base.autoencoder, base.settings, name="clip")
            self.by_image = {c.video[0].tobytes(): c for c in clips}

        def generate(self, image, c2w, K, caption=None, seed=0):
            clip = self.by_image[np.asarray(image).tobytes()]
            return clip.video[: num_frames(c2w.shape[0], self.stride)]

    cfg = ProtocolConfig(**FAST)
    base = VideoModel.from_bundle(bundles[0])
    clips = prepare_clips(load_clips(data_dir, 2), base, cfg)
    res = evaluate(ClipModel(base, clips), clips, "short", cfg, LPIPS(LPIPSConfig(allow_random_trunk=True)))["short"]
    assert res.summary["psnr"] == cfg.psnr_cap and res.summary["ssim"] == pytest.approx(1.0)
    assert res.curves["psnr"]["x"] == list(range(1, num_frames(8, STRIDE)))
    assert all(v == cfg.psnr_cap for v in res.curves["psnr"]["y"])
    # The static reference (first frame held) scores below the clip itself on moving clips; the gain is paired.
    for c in res.clips:
        assert c["hold_psnr"] < cfg.psnr_cap and c["gain_psnr"] == pytest.approx(c["psnr"] - c["hold_psnr"])
    # Camera errors of the clip's own frames equal the oracle's (same frames, same estimator).
    for c in res.clips:
        assert (math.isnan(c["R_dist_deg"]) and math.isnan(c["gt_R_dist_deg"])) or c["R_dist_deg"] == c["gt_R_dist_deg"]


# ---------------------------------------------------------------- action accuracy on synthetic renders


ACTION_RES = 128  # the two-view estimator needs resolution: 32 px frames give no matches at all
ROTATIONS = [0, 1, 1, 1, 2, 2, 0, 3, 4, 1, 5, 8, 2, 2, 0, 6, 7]  # rotation classes per latent (yaw, pitch, pairs)


def _render_ids(ids: list[int], scene_seed: int = 3) -> tuple[np.ndarray, torch.Tensor]:
    scene = Scene.random(scene_seed)
    K = make_intrinsics(90, ACTION_RES, ACTION_RES)
    c2w = keys_to_poses(action_id_to_keys(torch.tensor(ids)), MotionSteps(0.08, 3.0), free_start(scene))
    rgb, _ = render(scene, c2w.float(), K, ACTION_RES, ACTION_RES)
    return rgb.numpy(), K


def test_ground_truth_video_scores_100_percent_and_a_wrong_turn_loses_exactly_its_steps() -> None:
    keys = action_id_to_keys(torch.tensor(ROTATIONS))
    frames, K = _render_ids(ROTATIONS)
    res = action_scores(frames, K, keys, MotionSteps(0.08, 3.0))
    assert res["action_acc"] == 1.0 and res["fine_action_acc"] == 1.0 and all(res["step_hits"])

    # The video turns left where right was commanded (latents 2, 3 and 9): steps 1, 2 and 8 are wrong.
    wrong = list(ROTATIONS)
    for i in (2, 3, 9):
        wrong[i] = 2
    frames_wrong, _ = _render_ids(wrong)
    bad = action_scores(frames_wrong, K, keys, MotionSteps(0.08, 3.0))
    n = len(ROTATIONS) - 1
    assert bad["action_acc"] == pytest.approx((n - 3) / n)
    assert bad["translation_acc"] == 1.0 and bad["rotation_acc"] == pytest.approx((n - 3) / n)
    assert [i for i, h in enumerate(bad["step_hits"]) if not h] == [1, 2, 8]


def test_action_protocol_scores_the_true_video_of_its_commands_perfectly(tmp_path) -> None:
    """run_action end to end with a perfect generator at a resolution the estimator can use: the
    commanded keys, the latent frames and the steps line up, so every step matches. The protocol
    does not see the scene (it walks from the clip's first pose, rotations only); the generator does."""
    size = ACTION_RES
    scene = Scene.random(3)
    K = make_intrinsics(90, size, size)
    c2w = free_start(scene)[None].float()
    rgb, _ = render(scene, c2w, K, size, size)
    with ShardWriter(tmp_path / "d", samples_per_shard=8, overwrite=True) as w:
        w.write({"video": rgb.numpy(), "c2w": c2w.numpy(), "K": K[None].numpy().copy(), "keys": np.zeros((1, 8), bool),
                 "caption": "", "meta": {"source": "synthetic", "scene_seed": 3}})
    model, _ = tiny_model(0)
    base = VideoModel(model, PatchAutoencoder(4, STRIDE), settings_from_sampling({**SAMPLING, "height": size, "width": size}, "t"))
    cfg = ProtocolConfig(num=1, action_latents=16, walk=WalkConfig(w_move=0, w_move_rotate=0, w_rotate_rotate=0, w_still=0.3,
                                                                   pitch_prob=0.3, segment_min=1, segment_max=4))
    clips = prepare_clips(load_clips(tmp_path / "d", 1), base, cfg)
    hidden = [replace(c, scene=None, scene_note="hidden from the protocol") for c in clips]
    res = evaluate(TruthModel(base, clips), hidden, "action", cfg)["action"]
    assert res.clips[0]["path"] == "walk from the clip's first pose"
    assert res.summary["action_acc"] == 1.0 and res.summary["fine_action_acc"] == 1.0
    assert res.curves["step_acc"]["x"] == list(range(1, 16)) and res.curves["step_acc"]["y"] == [1.0] * 15


# ---------------------------------------------------------------- walks, clips, settings, generation


def test_random_walk_keys_match_its_poses_and_pitch_stays_in_its_band() -> None:
    start = make_pose(rotation_y(20.0), torch.tensor([0.5, -1.4, 0.2], dtype=torch.float64))
    cfg = WalkConfig(segment_min=2, segment_max=6)
    steps = MotionSteps(0.08, 3.0)
    for seed in range(3):
        keys, c2w = random_walk(120, np.random.default_rng(seed), steps, cfg, start)
        assert keys.shape == (120, 8) and c2w.shape == (120, 4, 4) and torch.equal(c2w[0], start)
        ids = keys_to_action_id(keys)
        assert torch.equal(keys_to_action_id(poses_to_keys(c2w, MotionThresholds())), ids)
        assert len(set(ids.tolist())) > 5  # composite actions, not one repeated key
    pitched = WalkConfig(w_move=0, w_rotate=1, w_move_rotate=0, w_rotate_rotate=1, w_still=0, pitch_prob=1.0, max_pitch_deg=10.0)
    _, c2w = random_walk(80, np.random.default_rng(0), steps, pitched, start)
    elevation = torch.rad2deg(torch.asin(-camera_forward(rebase_to_first(c2w))[:, 1]))
    assert elevation.abs().max() <= 10.0 + 1e-6 and elevation.abs().max() > 5.0
    a = random_walk(20, np.random.default_rng(9), steps, cfg, start)
    b = random_walk(20, np.random.default_rng(9), steps, cfg, start)
    assert torch.equal(a[1], b[1])


def test_paths_use_the_synthetic_planner_when_the_scene_is_known(data_dir) -> None:
    base_settings = settings_from_sampling(SAMPLING, "t")
    (name, raw), = load_clips(data_dir, 1)
    clip = prepare_clip(raw, name, base_settings.height, base_settings.width)
    steps = MotionSteps(0.08, 3.0)
    path = plan_path("revisit", clip, 12, STRIDE, steps, np.random.default_rng(0))
    assert path.source == "data.synthetic revisit planner" and path.truth.shape == (12, S, S, 3)
    assert torch.equal(path.c2w[path.pairs[:, 0]], path.c2w[path.pairs[:, 1]]) and path.pairs[-1].tolist() == [11, 0]
    assert np.array_equal(path.truth, clip.render(path.c2w)) and np.array_equal(path.image, path.truth[0])
    assert bool(clip.scene.free(camera_center(path.c2w), 0.3).all())
    rand = plan_path("random", clip, 12, STRIDE, steps, np.random.default_rng(0))
    assert torch.equal(keys_to_action_id(poses_to_keys(rand.c2w, MotionThresholds())), keys_to_action_id(rand.keys))
    # Without a scene: a walk from the clip's own first frame and pose.
    blind = plan_path("revisit", replace(clip, scene=None), 12, STRIDE, steps, np.random.default_rng(0))
    assert blind.truth is None and np.array_equal(blind.image, clip.video[0]) and torch.equal(blind.c2w[0], clip.c2w[0])
    assert torch.equal(blind.c2w[blind.pairs[:, 0]], blind.c2w[blind.pairs[:, 1]])


def test_out_and_back_returns_through_exactly_the_outbound_poses() -> None:
    _, out = random_walk(5, np.random.default_rng(0), MotionSteps(), WalkConfig())
    for T in (9, 10):
        c2w, pairs = out_and_back(out[: (T + 1) // 2], T)
        assert c2w.shape[0] == T and pairs.shape == (4, 2)
        assert torch.equal(c2w[pairs[:, 0]], c2w[pairs[:, 1]])
        assert pairs[:, 1].tolist() == [3, 2, 1, 0] and pairs[-1, 0] == T - 1
    with pytest.raises(ValueError, match="outbound poses"):
        out_and_back(out, 12)


def test_clip_scene_is_verified_and_fitting_follows_intrinsics(tmp_path) -> None:
    data = write_clips(tmp_path / "d", [3, 3], ["w-4", "w-4"], meta_seed=[3, 4])
    (n0, c0), (n1, c1) = load_clips(data, 2)
    good, wrong = prepare_clip(c0, n0, S, S), prepare_clip(c1, n1, S, S)
    assert good.scene is not None and good.scene_note == ""
    assert wrong.scene is None and "dB" in wrong.scene_note
    assert np.array_equal(good.render(good.c2w[:3]), good.video[:3])  # same size: the true render is the clip
    # A 64x48 render centre-cropped and resized to 32x32 looks like a direct render with the fitted K.
    scene = Scene.random(3)
    K = make_intrinsics(90, 64, 48)
    c2w = free_start(scene)[None].float()
    big, _ = render(scene, c2w, K, 48, 64)
    small, K_fit = fit_frames(big.numpy(), K[None], 32, 32)
    direct, _ = render(scene, c2w, K_fit[0].float(), 32, 32)
    from eval.metrics import psnr

    assert float(psnr(torch.from_numpy(small), direct)[0]) > 18.0
    # fx 32 at 64 px wide; crop 8 px off each side (cx 32 -> 24), then scale 48 -> 32 px.
    assert K_fit[0, 0, 2].item() == pytest.approx(16.0) and K_fit[0, 0, 0].item() == pytest.approx(64 / 3)


def test_settings_from_sampling() -> None:
    s = settings_from_sampling({**SAMPLING, "model_type": "bidirectional", "window_latents": 8,
                                "translation_step": 0.1, "rotation_threshold_deg": 0.1}, "b", steps=3)
    assert s.rollout.mode == "window" and s.rollout.steps == 3 and (s.height, s.width) == (S, S)
    assert s.steps.translation == 0.1 and s.thresholds.rotation_deg == 0.1
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\]"):
        settings_from_sampling({**SAMPLING, "stepz": 3}, "b")
    with pytest.raises(ValueError, match="video size is unknown"):
        settings_from_sampling(RolloutConfig(), "b")
    assert settings_from_sampling(RolloutConfig(), "b", height=16, width=24).width == 24


def test_generate_returns_whole_groups_and_checks_its_path(bundles) -> None:
    vm = VideoModel.from_bundle(bundles[0])
    assert (vm.unit, vm.stride, vm.fit_length(11), vm.fit_length(3)) == (4, STRIDE, 8, 0)
    image = np.zeros((S, S, 3), np.uint8)
    c2w = keys_to_poses(action_id_to_keys(torch.tensor([0, 9, 9, 1, 1, 0, 9, 9])), MotionSteps())
    K = make_intrinsics(90, S, S)
    frames = vm.generate(image, c2w, K, seed=3)
    assert frames.shape == (num_frames(8, STRIDE), S, S, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, vm.generate(image, c2w, K, seed=3))  # seeded: reproducible
    # Batched: each row keeps its own seed, so a clip's video does not depend on its batch.
    c2w_b = keys_to_poses(action_id_to_keys(torch.tensor([1, 1, 9, 0, 0, 0, 9, 1])), MotionSteps())
    image_b = np.full((S, S, 3), 90, np.uint8)
    many = vm.generate_many([Request(image, c2w, K, seed=3), Request(image_b, c2w_b, K, seed=5)], batch=2)
    assert np.abs(many[0].astype(int) - frames.astype(int)).max() <= 1
    assert np.abs(many[1].astype(int) - vm.generate(image_b, c2w_b, K, seed=5).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="whole units of 4 latents"):
        vm.generate(image, c2w[:6], K)
    with pytest.raises(ValueError, match=r"image must be uint8 \[32, 32, 3\]"):
        vm.generate(np.zeros((S, S + 1, 3), np.uint8), c2w, K)


def test_training_hook_returns_flat_metrics_and_restores_train_mode(data_dir, tmp_path) -> None:
    from eval.hook import evaluate_model

    model, _ = tiny_model(4)
    model.train()
    ae = PatchAutoencoder(patch_size=4, temporal_patch=STRIDE)
    sampling = RolloutConfig(chunk_size=4, steps=2, memory=MemoryConfig(chunk_size=4, temporal_latents=4, max_context=12))
    cfg = ProtocolConfig(short_latents=8)
    metrics = evaluate_model(model, ae, sampling, data_dir, num=1, seed=0, config=cfg, out_dir=tmp_path / "hook")
    assert model.training
    assert {"eval/short/psnr", "eval/short/ssim", "eval/short/R_dist_deg", "eval/short/num_clips"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert math.isfinite(metrics["eval/short/psnr"]) and metrics["eval/short/num_clips"] == 1.0
    assert (tmp_path / "hook" / "report.md").is_file()


def test_resumed_evaluation_keeps_finished_rows_and_redoes_changed_ones(bundles, data_dir, tmp_path) -> None:
    from eval.__main__ import evaluate_bundles

    out, logs = tmp_path / "report", []
    cfg = ProtocolConfig(**FAST)
    first = json.loads(evaluate_bundles(bundles, data_dir, out, "short", cfg, resume=True, log=logs.append).json.read_text())
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["run_a_bundle.pt", "run_b_bundle.pt"]
    logs.clear()
    again = json.loads(evaluate_bundles(bundles, data_dir, out, "short", cfg, resume=True, log=logs.append).json.read_text())
    assert sum("kept from an earlier call" in line for line in logs) == 2
    assert [b["protocols"] for b in again["bundles"]] == [b["protocols"] for b in first["bundles"]]
    logs.clear()  # another seed is another evaluation: nothing is reused
    evaluate_bundles(bundles, data_dir, out, "short", replace(cfg, seed=1), resume=True, log=logs.append)
    assert not any("kept" in line for line in logs)


def test_evaluation_cut_off_reports_the_rows_it_finished(bundles, data_dir, tmp_path) -> None:
    from eval.__main__ import evaluate_bundles

    class TimeUp(Exception):
        pass

    def log(line: str) -> None:  # the time budget runs out just after the first row is finished
        if line.startswith("[eval] ") and ": short " in line:
            raise TimeUp

    out = tmp_path / "report"
    with pytest.raises(TimeUp):
        evaluate_bundles(bundles, data_dir, out, "short", ProtocolConfig(**FAST), resume=True, log=log)
    report = json.loads((out / "report.json").read_text())
    names = [b["name"] for b in report["bundles"]]
    assert len(names) == 1 and len(list((out / "rows").iterdir())) == 1
    assert "run_b" not in (out / "report.md").read_text()


def test_denoising_diagnostic_scores_each_sigma_and_each_sampler_call(bundles, data_dir, tmp_path) -> None:
    from eval.denoising import diagnose, format_report, main

    model = VideoModel.from_bundle(bundles[0])
    result = diagnose(model, data_dir, num=2, sigmas=[0.05, 0.5, 1.0])
    tf, sp = result["teacher_forced"], result["sampler"]
    assert result["clips"] == 2 and tf["sigma"] == [0.05, 0.5, 1.0]
    assert tf["noisy_input"][0] > tf["noisy_input"][1] > tf["noisy_input"][2]  # more noise, further from the truth
    assert len(set(tf["held"])) == 1 and all(math.isfinite(v) for v in tf["x0_hat"])
    steps = model.settings.rollout.steps
    assert len(sp["sigma"]) == steps and sp["sigma"][0] == 1.0 and sp["sigma"] == sorted(sp["sigma"], reverse=True)
    assert "| 0.05 |" in format_report(result)
    with pytest.raises(ValueError, match="sigmas must lie in"):
        diagnose(model, data_dir, num=1, sigmas=[0.0])
    assert main(["--bundle", str(bundles[0]), "--data", str(data_dir), "--num", "1", "--sigmas", "0.1,1",
                 "--json", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["teacher_forced"]["sigma"] == [0.1, 1.0]
