"""The WorldCompass RL stage (rl/): the NFT update's identities, advantages, rewards against exact ground truth,
group rollouts against the inference sampler, a toy flow that RL moves, and the stage end to end with exact resume."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.actions import MotionSteps, keys_to_poses
from data.geometry import make_intrinsics, make_pose, rotation_y
from data.poseio import parse_pose_string
from data.shards import ShardWriter
from data.synthetic import Scene, SyntheticConfig, make_clip, render
from models.autoencoders import AutoencoderConfig
from models.bundle import load_bundle, read_bundle_meta, save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.flow import add_noise, euler_step, inference_sigmas, output_to_x0
from models.text_encoders import TextEncoderConfig
from rl.advantages import HIST_BINS, compute_advantages, standardize
from rl.config import DriftRewardConfig, GeometryRewardConfig, LearnedRewardConfig, RLStageConfig
from rl.nft import adaptive_flow_matching, nft_loss
from rl.rewards import build_rewards
from rl.rewards.base import RewardBatch
from rl.rewards.drift import QualityDriftReward
from rl.rewards.geometry import ExactGeometryReward
from rl.rewards.learned import LearnedReward
from rl.shadow import PolicyShadow
from model_helpers import randomize

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")]

S = 16  # frame size of the stage tests' clips and bundle (patch 4: 4 x 4 tokens of 48 channels per latent)
SAMPLING = {"chunk_size": 4, "steps": 3, "shift": 3.0, "height": S, "width": S,
            "memory": {"chunk_size": 4, "temporal_latents": 4, "spatial_chunks": 1, "max_context": 12, "num_points": 500}}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """Three synthetic-world clips (scene seed in meta, so paths are planned and rendered exactly)."""
    out = tmp_path_factory.mktemp("rl_data")
    cfg = SyntheticConfig(num_frames=17, height=S, width=S, trajectory="random")
    with ShardWriter(out, samples_per_shard=8, overwrite=True) as w:
        for seed in (11, 12, 13):
            clip = make_clip(seed, cfg, depth=False)
            w.write(clip)
    return out


def _tiny_bundle(path: Path, prediction: str = "x0") -> Path:
    cfg = replace(preset("tiny"), latent_channels=48, text_dim=0, depth=1, prediction=prediction)
    model = randomize(WorldDiT(cfg), 3).eval()
    return save_bundle(path, model, model_cfg=cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4),
                       text_encoder_cfg=TextEncoderConfig(kind="none"), sampling=SAMPLING,
                       meta={"stage": "midtrain", "step": 7, "data": {"num_latents": 12}}, overwrite=True)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return _tiny_bundle(tmp_path_factory.mktemp("rl_bundle") / "bundle")


def rl_overrides(bundle: Path, data: Path, *extra: str) -> list[str]:
    return [
        "stage=rl", f"init={bundle}", f"data.path={data}", "model.latent_channels=48", "model.text_dim=0",
        "autoencoder.patch_size=4", "data.height=16", "data.width=16", "logger.wandb=false", "logger.progress_bar=false",
        "logger.log_every=1", "optim=muon", "optim.lr=1e-3", "trainer.grad_accum=2",
        "stage.num_candidates=3", "stage.bestofn=2", "stage.rollout_steps=2", "stage.shift=3.0", "stage.window_latents=8",
        "stage.train_timestep_fraction=0.5", "stage.rewards.workers=1", "stage.eval_groups=1", "stage.eval_chunks=2",
        "stage.paths.kind=mixed", "stage.paths.revisit_prob=0.5",
        "+stage.weights.geometry=1.0", "stage.weights.action=0.0", "+stage.weights.revisit=0.5", *extra,
    ]


def compose(overrides: list[str]):
    from configs.schema import compose_checked

    return compose_checked(overrides)[0]


# ---------------------------------------------------------------------------------------------- the NFT update
def _toy_batch(seed: int = 0, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 6, generator=g) * 0.3)
        lin.bias.copy_(torch.randn(6, generator=g) * 0.1)
    x = torch.randn(B, 6, generator=g)
    x0 = torch.randn(B, 6, generator=g)
    old = torch.randn(B, 6, generator=g)
    r = torch.rand(B, generator=g)
    return lin, x, x0, old, r


def _grads(loss: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(module.parameters())))


def _adaptive_by_hand(pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    err = pred - x0
    return (err.square().mean(1) / err.detach().abs().mean(1).clamp_min(1e-5)).mean()


def test_r_one_is_adaptive_weighted_flow_matching() -> None:
    """r = 1: at beta = 1 (any v_old) the loss and its gradient are the adaptively weighted flow-matching loss;
    on-policy (v_old = sg(v)) its gradient is that loss's gradient at any beta."""
    lin, x, x0, old, _ = _toy_batch()
    ones = torch.ones(x.shape[0])
    ref = _adaptive_by_hand(lin(x), x0)
    assert torch.allclose(adaptive_flow_matching(lin(x), x0), ref)
    loss, _ = nft_loss(lin(x), old, x0, ones, beta=1.0)
    assert torch.allclose(loss, ref, rtol=1e-6)
    for a, b in zip(_grads(loss, lin), _grads(_adaptive_by_hand(lin(x), x0), lin)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for beta in (0.1, 0.5, 2.0):
        pred = lin(x)
        loss, _ = nft_loss(pred, pred.detach(), x0, ones, beta=beta)
        assert torch.allclose(loss * beta, ref, rtol=1e-5)  # the value carries the 1 / beta normalisation
        for a, b in zip(_grads(loss, lin), _grads(_adaptive_by_hand(lin(x), x0), lin)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # off-policy with beta < 1 the positive branch is a mixture: not plain flow matching any more
    loss, _ = nft_loss(lin(x), old, x0, ones, beta=0.5)
    assert not torch.allclose(loss, ref, rtol=1e-3)


def test_released_overwrite_gradient_is_2r_minus_1_times_grad_l_plus() -> None:
    """v_old = sg(v_theta), beta = 1 (the released WorldCompass code): grad = mean_b (2 r_b - 1) grad L+_b."""
    lin, x, x0, old, r = _toy_batch(seed=1)
    loss, _ = nft_loss(lin(x), None, x0, r, beta=1.0, official_overwrite=True)
    explicit, _ = nft_loss(lin(x), lin(x).detach(), x0, r, beta=1.0)
    assert torch.allclose(loss, explicit)

    def target() -> torch.Tensor:
        err = lin(x) - x0
        return ((2 * r - 1) * err.square().mean(1) / err.detach().abs().mean(1)).mean()

    for a, b in zip(_grads(loss, lin), _grads(target(), lin)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # the corrected update (v_old from the sampling policy) is a different update
    fixed, _ = nft_loss(lin(x), old, x0, r, beta=1.0)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_grads(fixed, lin), _grads(target(), lin)))


def test_nft_mask_excludes_entries() -> None:
    lin, x, x0, old, r = _toy_batch(seed=2)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    a, _ = nft_loss(lin(x), old, x0, r, mask=mask)
    b, _ = nft_loss(lin(x)[:, :3], old[:, :3], x0[:, :3], r)
    assert torch.allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- advantages
def test_zero_variance_group_gives_zero_advantage_and_no_nan() -> None:
    group = torch.arange(3).repeat_interleave(4)
    flat = torch.full((4,), 0.7)
    varied = torch.tensor([0.1, 0.5, 0.9, 0.3])
    broken = torch.tensor([float("nan")] * 4)
    for std_type in ("global", "group", "group_max"):
        rewards = {"a": torch.cat([flat, varied, broken]), "b": torch.cat([varied, flat, varied])}
        adv = compute_advantages(rewards, group, {"a": 2.0, "b": 1.0}, std_type=std_type, bestofn=4, adv_clip=2.0)
        assert torch.isfinite(adv.advantage).all() and torch.isfinite(adv.r).all()
        assert torch.equal(adv.components["a"][:4], torch.zeros(4, dtype=torch.float64))  # flat group
        assert torch.equal(adv.components["a"][8:], torch.zeros(4, dtype=torch.float64))  # undefined rewards
        assert torch.equal(adv.components["b"][4:8], torch.zeros(4, dtype=torch.float64))
        assert adv.metrics["reward/a/zero_std_groups"] == pytest.approx(2 / 3)
        assert adv.metrics["reward/a/nan_share"] == pytest.approx(1 / 3)
        assert 0 <= float(adv.r.min()) and float(adv.r.max()) <= 1
        assert sum(adv.metrics[f"adv/hist_{i}"] for i in range(HIST_BINS)) == pytest.approx(1.0)
    all_flat = compute_advantages({"a": torch.ones(8)}, torch.arange(2).repeat_interleave(4), {"a": 1.0})
    assert torch.equal(all_flat.r, torch.full((8,), 0.5, dtype=torch.float64))
    assert all_flat.metrics["adv/zero_std_groups"] == 1.0


def test_standardisation_best_of_n_and_clipping() -> None:
    vals = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 10.0, 10.0, 10.0, 10.0, 20.0], dtype=torch.float64)
    group = torch.arange(2).repeat_interleave(6)
    a, _ = standardize(vals, group, "group")
    g0 = vals[:6]
    assert torch.allclose(a[:6], (g0 - g0.mean()) / g0.std(unbiased=False))
    a, _ = standardize(vals, group, "global")
    assert torch.allclose(a[:6], (g0 - g0.mean()) / vals.std(unbiased=False))
    adv = compute_advantages({"a": vals}, group, {"a": 1.0}, std_type="group", bestofn=4, adv_clip=1.0,
                             generator=torch.Generator().manual_seed(0))
    assert len(adv.kept) == 8
    kept0 = sorted(k for k in adv.kept.tolist() if k < 6)
    assert kept0 == [0, 1, 4, 5]  # top two and bottom two of group 0
    assert float(adv.advantage.abs().max()) <= 1.0 and float(adv.r[11]) == 1.0  # the outlier is clipped to r = 1


# ---------------------------------------------------------------------------------------------- rewards
def _free_start(scene: Scene) -> torch.Tensor:
    for x in np.linspace(-2, 2, 9):
        for z in np.linspace(-2, 2, 9):
            p = torch.tensor([x, -1.4, z], dtype=torch.float64)
            if bool(scene.free(p, 0.8)):
                return make_pose(rotation_y(20.0), p)
    raise AssertionError("no free start")


def _rendered_path(moves: str, size: int, steps=(0.08, 3.0), scene_seed: int = 4):
    scene = Scene.random(scene_seed)
    keys = parse_pose_string(moves)
    c2w = keys_to_poses(keys, MotionSteps(*steps), _free_start(scene))
    K = make_intrinsics(90, size, size)
    rgb, _ = render(scene, c2w.float(), K, size, size)
    return rgb, keys, c2w, K


def _batch(frames, first, prev, keys, c2w, K, truth=None, alt=None, scored=None) -> RewardBatch:
    R, L = frames.shape[:2]
    return RewardBatch(frames=frames, first_frame=first, prev_frame=prev, keys=keys, c2w=c2w, K=K, steps=MotionSteps(0.08, 3.0),
                       scored=scored if scored is not None else torch.ones(R, L, dtype=torch.bool),
                       group=torch.zeros(R, dtype=torch.long), start=1, truth=truth, truth_alt=alt)


def test_exact_geometry_reward_is_maximal_at_the_true_render() -> None:
    rgb, keys, c2w, K = _rendered_path("w-4, right-4", S)
    truth = rgb[1:5]  # a chunk of 4 latents after latent 0
    still = rgb[0:1].expand(4, -1, -1, -1)  # the camera did not move: the path not taken
    noisy = (truth.float() + torch.randn(truth.shape, generator=torch.Generator().manual_seed(0)) * 8).clamp(0, 255).to(torch.uint8)
    shifted = torch.roll(truth, 1, dims=2)
    cands = torch.stack([truth, noisy, still, shifted, rgb[5:9]])
    R = cands.shape[0]
    batch = _batch(cands, rgb[0].expand(R, -1, -1, -1), rgb[0].expand(R, -1, -1, -1), keys[1:5].expand(R, -1, -1),
                   c2w[1:5].expand(R, -1, -1, -1), K.double().expand(R, 3, 3), truth=truth.expand(R, -1, -1, -1, -1),
                   alt=still.expand(R, -1, -1, -1, -1))
    cfg = GeometryRewardConfig(psnr_cap=50.0, alt_weight=1.0)
    g = ExactGeometryReward(cfg)(batch).scores["geometry"]
    assert g[0] == 50.0 and bool((g[1:] < g[0]).all())
    # the still video is closer to the path not taken than to its own: it pays for it on top of its PSNR
    plain = ExactGeometryReward(replace(cfg, alt_weight=0.0))(batch).scores["geometry"]
    assert g[2] < plain[2] and g[0] == plain[0]
    assert math.isnan(float(ExactGeometryReward(cfg)(replace(batch, truth=None)).scores["geometry"][0]))


def test_drift_reward_is_zero_at_the_anchor_and_punishes_exposure_and_blur() -> None:
    rgb, keys, c2w, K = _rendered_path("w-4", 32)
    first = rgb[0]
    same = first.expand(4, -1, -1, -1)
    bright = (first.float() * 1.8).clamp(0, 255).to(torch.uint8).expand(4, -1, -1, -1)
    blur = torch.nn.functional.avg_pool2d(first.permute(2, 0, 1).float()[None], 5, 1, 2)[0].permute(1, 2, 0).round().to(torch.uint8).expand(4, -1, -1, -1)
    cands = torch.stack([same, rgb[1:5], bright, blur])
    batch = _batch(cands, first.expand(4, -1, -1, -1), None, keys[1:5].expand(4, -1, -1), c2w[1:5].expand(4, -1, -1, -1), K.double().expand(4, 3, 3))
    d = QualityDriftReward(DriftRewardConfig())(batch).scores["drift"]
    assert d[0] == 0.0 and d[1] > d[2] and d[1] > d[3] and bool((d[1:] < 0).all())


def test_action_reward_scores_the_true_video_of_its_commands(tmp_path) -> None:
    """At 128 px the evaluation's estimator recovers the commanded chunk after the prefix frame; a frozen chunk fails."""
    from rl.config import ActionRewardConfig
    from rl.rewards.action import ActionReward

    rgb, keys, c2w, K = _rendered_path("right-2, left-4", 128, steps=(0.15, 4.0), scene_seed=3)  # a turn inside the chunk
    chunk = rgb[2:6]
    frozen = rgb[1:2].expand(4, -1, -1, -1)
    cands = torch.stack([chunk, frozen])
    batch = _batch(cands, rgb[0].expand(2, -1, -1, -1), rgb[1].expand(2, -1, -1, -1), keys[2:6].expand(2, -1, -1),
                   c2w[2:6].expand(2, -1, -1, -1), K.double().expand(2, 3, 3))
    batch = replace(batch, steps=MotionSteps(0.15, 4.0))
    out = ActionReward(ActionRewardConfig())(batch).scores
    assert out["action"][0] == 1.0 and out["action_exact"][0] == 1.0
    assert out["action"][1] < 1.0


def test_learned_reward_loads_a_local_torchscript_and_names_missing_files(tmp_path) -> None:
    class Red(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0].mean(dim=(1, 2))

    torch.jit.script(Red()).save(str(tmp_path / "model.pt"))
    reward = LearnedReward(LearnedRewardConfig(name="red", path=str(tmp_path)))
    frames = torch.zeros(2, 3, 8, 8, 3, dtype=torch.uint8)
    frames[0, ..., 0] = 255
    batch = _batch(frames, frames[:, 0], None, torch.zeros(2, 3, 8, dtype=torch.bool), torch.eye(4).expand(2, 3, 4, 4).double(),
                   torch.eye(3).expand(2, 3, 3).double())
    assert reward(batch).scores["red"].tolist() == [1.0, 0.0]
    with pytest.raises(FileNotFoundError, match="does not exist.*local files only"):
        LearnedReward(LearnedRewardConfig(name="hps", path=str(tmp_path / "missing")))
    with pytest.raises(KeyError, match="unknown reward score.*'aesthetics'"):
        build_rewards(RLStageConfig().rewards, ["drift", "aesthetics"])


# ---------------------------------------------------------------------------------------------- the toy flow
class ToyFlow(nn.Module):
    """A 2-D flow model predicting x0 from (x_sigma, sigma)."""

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"prediction": "x0"})()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, torch.as_tensor(sigma).reshape(-1, 1).expand(x.shape[0], 1)], dim=1))


def _sample(model: nn.Module, n: int, g: torch.Generator, sigmas: torch.Tensor) -> torch.Tensor:
    x = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        for k in range(len(sigmas) - 1):
            s = sigmas[k]
            x0 = output_to_x0(model(x, s), x, s, "x0")
            v = (x - x0) / s
            x = euler_step(x, v, sigmas[k], sigmas[k + 1])
    return x


@pytest.fixture(scope="module")
def toy_flow() -> ToyFlow:
    """Pretrained on two blobs at x = -2 and x = +2 (half the samples land on each side)."""
    torch.manual_seed(0)
    model = ToyFlow()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        side = torch.randint(0, 2, (256, 1), generator=g).float() * 4 - 2
        x0 = torch.cat([side, torch.zeros(256, 1)], 1) + 0.3 * torch.randn(256, 2, generator=g)
        eps = torch.randn(256, 2, generator=g)
        s = torch.rand(256, generator=g)
        pred = model(add_noise(x0, eps, s), s)
        loss = (output_to_x0(pred, add_noise(x0, eps, s), s, "x0") - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rl_toy(model: ToyFlow, sign: float, steps: int = 20) -> float:
    policy = copy.deepcopy(model).train()
    cfg = RLStageConfig()
    shadow = PolicyShadow(policy, cfg.shadow_decay)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    sigmas = inference_sigmas(8, 1.0)
    g = torch.Generator().manual_seed(1)
    P, G = 8, 8
    for step in range(1, steps + 1):
        x0 = _sample(shadow.module, P * G, g, sigmas)
        adv = compute_advantages({"right": sign * x0[:, 0].double()}, torch.arange(P).repeat_interleave(G), {"right": 1.0},
                                 bestofn=G, adv_clip=2.0, generator=g)
        r = adv.r.float()
        for k in torch.randperm(8, generator=g)[:4].tolist():
            s = sigmas[k]
            x = add_noise(x0, torch.randn(x0.shape, generator=g), s)
            with torch.no_grad():
                old = output_to_x0(shadow.module(x, s), x, s, "x0")
            loss, _ = nft_loss(output_to_x0(policy(x, s), x, s, "x0"), old, x0, r, beta=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        shadow.update(policy, step)
    final = _sample(policy, 2000, torch.Generator().manual_seed(5), sigmas)
    return float((final[:, 0] > 0).float().mean())


def test_toy_flow_moves_toward_the_rewarded_region_and_away_with_the_sign_flipped(toy_flow) -> None:
    before = float((_sample(toy_flow, 2000, torch.Generator().manual_seed(5), inference_sigmas(8, 1.0))[:, 0] > 0).float().mean())
    assert 0.35 < before < 0.65
    assert _rl_toy(toy_flow, +1.0) > 0.85
    assert _rl_toy(toy_flow, -1.0) < 0.15


# ---------------------------------------------------------------------------------------------- the stage
def _run(overrides: list[str], run_dir: Path):
    from train.run import run

    return run(compose(overrides), run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


class _Recorder:
    """A NoiseFn that draws Gaussian noise and records every draw in order."""

    def __init__(self):
        from models.rollout import gaussian_noise

        self.draw, self.noise = gaussian_noise, []

    def __call__(self, shape, *, generator, device, dtype, chunk, step):
        out = self.draw(shape, generator=generator, device=device, dtype=dtype, chunk=chunk, step=step)
        self.noise.append(out.clone())
        return out


def test_group_rollouts_equal_the_inference_sampler_bit_for_bit(bundle_dir, synth_dir) -> None:
    """Prefix + candidate j of a group rollout is exactly what the inference path (VideoModel.generate: the bundle's
    sampler, conditioning rule and image encoding) produces from the same start image, path and noise."""
    from eval.protocols.runner import VideoModel
    from models.bundle import read_bundle_config
    from models.rollout import Rollout
    from rl.evaluate import rl_settings
    from rl.paths import PathSource
    from rl.rollouts import roll_out_group

    vm = VideoModel.from_bundle(bundle_dir)
    scfg = RLStageConfig(rollout_steps=None, shift=None)
    settings = rl_settings(read_bundle_config(bundle_dir)["sampling"], scfg, "test")
    assert settings.rollout == vm.settings.rollout
    source = PathSource(replace(scfg.paths, kind="mixed", revisit_prob=0.5), str(synth_dir), settings, 1, seed=0)
    paths = [source.plan(1, g, 12) for g in range(2)]
    assert all(p.path.truth is not None for p in paths)  # synthetic scenes: the data package's planner
    rec = _Recorder()
    G, n = 3, 3
    gr = roll_out_group(Rollout(vm.model, settings.rollout, noise_fn=rec), vm.autoencoder, paths, n, G,
                        torch.Generator().manual_seed(0), torch.device("cpu"))
    assert gr.record.latents.shape[0] == 2 * G and gr.prefix.latents.shape[2] == 8 and len(rec.noise) == n
    assert (gr.record.latents[0] - gr.record.latents[1]).abs().max() > 1e-3  # candidates differ
    captured = {}
    generate = vm.rollout.generate

    def spy(*a, **kw):
        captured["res"] = generate(*a, **kw)
        return captured["res"]

    vm.rollout.generate = spy
    for g, p in enumerate(paths):
        for j in range(G):
            row = g * G + j

            def replay(shape, *, generator, device, dtype, chunk, step, g=g, row=row):
                assert step == 0  # the Euler ODE draws one noise per chunk: prefix chunks in order, then the candidates
                return (rec.noise[-1][row:row + 1] if chunk == n - 1 else rec.noise[chunk][g:g + 1]).to(device=device, dtype=dtype)

            vm.rollout.noise_fn = replay
            vm.generate(p.path.image, p.path.c2w, p.K_pixel, seed=0)
            ref = captured["res"].latents
            assert torch.equal(ref[:, :, :8], gr.prefix.latents[g:g + 1])
            assert torch.equal(ref[:, :, 8:], gr.record.latents[row:row + 1])


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights (checkpoint EMA and raw) and the last checkpoint's policy shadow."""
    from safetensors.torch import load_file

    bundle = run_dir / "export" / "bundle"
    state = {f"ema.{k}": v for k, v in load_file(str(bundle / "model.safetensors")).items()}
    state.update({f"raw.{k}": v for k, v in load_file(str(bundle / "model_raw.safetensors")).items()})
    last = sorted((run_dir / "ckpt").glob("step_*"))[-1]
    shadow = torch.load(last / "rank_00000.pt", map_location="cpu", weights_only=False)["stage"]["shadow"]["params"]
    state.update({f"shadow.{k}": v for k, v in shadow.items()})
    return state


def test_rl_stage_trains_logs_exports_and_resumes_exactly(bundle_dir, synth_dir, tmp_path) -> None:
    """Three RL steps straight equal two steps, a resume and a third (policy, optimizer, checkpoint EMA, policy
    shadow); every reward component, the zero-std shares, the advantage histogram and the time split are logged;
    the export is a bundle with lineage that the inference loader accepts."""
    base = rl_overrides(bundle_dir, synth_dir, "checkpoint.every=1", "checkpoint.keep_last=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(base + ["trainer.steps=3"], straight).status == "completed"
    _run(base + ["trainer.steps=2"], split)
    assert _run(base + ["trainer.steps=3", "checkpoint.resume=latest"], split).step == 3
    a, b = _final_state(straight), _final_state(split)
    assert a.keys() == b.keys() and len(a) > 3
    assert any(not torch.equal(a[f"ema.{k}"], a[f"raw.{k}"]) for k in load_bundle(bundle_dir).model.state_dict())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = _metrics(straight)
    assert [r["rl/target_chunk"] for r in rows] == [1.0, 2.0, 1.0]  # min2max over window_latents / chunk = 2
    for key in ("reward/geometry", "reward/drift", "reward/geometry/zero_std_groups", "adv/zero_std_groups", "adv/hist_0",
                "nft/loss_pos", "nft/loss_neg", "time/prefix", "time/candidates", "time/decode", "time/reward", "time/update"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    assert rows[0]["nft/loss_pos"] == rows[0]["nft/loss_neg"]  # step 1: the shadow is the policy (on-policy)
    assert rows[1]["nft/loss_pos"] != rows[1]["nft/loss_neg"]  # afterwards v_old (the sampler) differs from v
    meta = read_bundle_meta(straight / "export" / "bundle")
    assert meta["stage"] == "rl" and meta["step"] == 3 and meta["parent"]["path"] == str(bundle_dir.resolve())
    assert meta["rl"]["weights"] == {"drift": 1.0, "geometry": 1.0, "revisit": 0.5}
    out = load_bundle(straight / "export" / "bundle")
    ref = load_bundle(bundle_dir)
    assert out.sampling == ref.sampling
    assert any(not torch.equal(p, q) for p, q in zip(out.model.state_dict().values(), ref.model.state_dict().values()))


def test_rl_stage_config_errors_name_the_problem(bundle_dir, synth_dir, tmp_path) -> None:
    from configs.schema import ConfigError

    with pytest.raises(ConfigError, match="stage.std_type"):
        compose(rl_overrides(bundle_dir, synth_dir, "stage.std_type=prompt"))
    with pytest.raises(ConfigError, match="stage.num_candidates"):
        compose(rl_overrides(bundle_dir, synth_dir, "stage.num_candidates=1"))
    with pytest.raises(KeyError, match="unknown reward score"):
        _run(rl_overrides(bundle_dir, synth_dir, "+stage.weights.hpsv3=1.0", "trainer.steps=1"), tmp_path / "a")
    with pytest.raises(ValueError, match="pass init=<bundle"):
        _run([o for o in rl_overrides(bundle_dir, synth_dir, "trainer.steps=1") if not o.startswith("init=")], tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        _run(rl_overrides(bundle_dir, tmp_path / "nowhere", "trainer.steps=1"), tmp_path / "c")


def test_rl_stage_with_lora_and_kl_on_a_v_prediction_model_exports_adapter_and_merged_bundle(synth_dir, tmp_path) -> None:
    """LoRA, the KL term and the released update on a model whose output is a velocity (models.flow reads it)."""
    bundle_dir = _tiny_bundle(tmp_path / "v_bundle", prediction="v")
    run_dir = tmp_path / "lora"
    over = rl_overrides(bundle_dir, synth_dir, "trainer.steps=1", "lora.enabled=true", "lora.rank=4", "lora.alpha=4",
                        "stage.kl_weight=1e-2", "stage.official_overwrite=true")
    assert _run(over, run_dir).status == "completed"
    row = _metrics(run_dir)[0]
    assert math.isfinite(row["nft/kl"]) and row["nft/loss_pos"] == row["nft/loss_neg"]  # released update: v_old = sg(v)
    assert (run_dir / "export" / "adapter" / "adapter.safetensors").is_file() and (run_dir / "export" / "adapter" / "adapter_raw.safetensors").is_file()
    merged = load_bundle(run_dir / "export" / "bundle")
    assert read_bundle_meta(run_dir / "export" / "bundle")["lora"]["rank"] == 4
    assert set(merged.model.state_dict()) == set(load_bundle(bundle_dir).model.state_dict())


class _Redness(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))


def test_rl_stage_moves_the_world_model_toward_its_reward_and_away_with_the_sign_flipped(bundle_dir, synth_dir, tmp_path) -> None:
    """The whole stage (sampler, rewards, advantages, contexts, NFT, shadow) on the tiny world model with a learned
    reward read from a local TorchScript file (red minus blue): 20 steps raise the reward of the exported bundle on
    the fixed evaluation paths; with the weight negated they lower it."""
    from omegaconf import OmegaConf

    from rl.evaluate import evaluate_bundle

    torch.jit.script(_Redness()).save(str(tmp_path / "model.pt"))
    common = ["trainer.steps=20", "checkpoint.every=0", "stage.weights.geometry=0.0", "stage.weights.revisit=0.0",
              "stage.weights.drift=0.0", f"stage.rewards.learned=[{{name: red, path: {tmp_path}}}]", "stage.num_candidates=6",
              "stage.bestofn=4", "stage.eval_groups=3", "stage.eval_chunks=2"]
    scfg = OmegaConf.to_object(compose(rl_overrides(bundle_dir, synth_dir, *common, "+stage.weights.red=1.0"))).stage
    before = evaluate_bundle(bundle_dir, scfg, str(synth_dir))["red"]
    after = {}
    for sign in (1.0, -1.0):
        run_dir = tmp_path / f"run_{sign:+.0f}"
        _run(rl_overrides(bundle_dir, synth_dir, *common, f"+stage.weights.red={sign}"), run_dir)
        after[sign] = evaluate_bundle(run_dir / "export" / "bundle", scfg, str(synth_dir))["red"]
    assert after[1.0] > before + 0.03 and after[-1.0] < before - 0.03, (before, after)


def test_demo_step_reports_every_reward_before_and_after(bundle_dir, synth_dir, tmp_path) -> None:
    """rl.demo.run_demo_rl (what make demo calls): experiment=demo_rl on a bundle, rewards of both bundles on fixed paths."""
    from rl.demo import run_demo_rl

    over = ["trainer.steps=2", "stage.num_candidates=3", "stage.rollout_steps=2", "stage.eval_groups=1", "stage.eval_chunks=2",
            "stage.window_latents=8", "stage.paths.num_clips=3", "stage.rewards.workers=1", "logger.log_every=1"]
    report = run_demo_rl(tmp_path / "rl", bundle_dir, synth_dir, over, device="cpu")
    assert report["steps"] == 2 and set(report["rewards"]) == {"geometry", "revisit", "drift"}
    assert report["rewards"]["geometry"]["weight"] == 1.0 and report["rewards"]["drift"]["weight"] == 0.0
    assert all(math.isfinite(report["rewards"]["geometry"][k]) for k in ("before", "after"))
    assert set(report["time_split"]) == {"plan", "prefix", "candidates", "decode", "reward", "update"}
    assert any("geometry" in ln for ln in report["lines"]) and (tmp_path / "rl" / "rl_report.json").is_file()
