"""Distillation (distill/): ODE initialisation and Context Forcing / Self-Forcing DMD on the tiny WorldDiT, CPU.

The parent (AR, multi-step) and teacher (bidirectional, memory) bundles are random tiny models written
with save_bundle: what is tested is the machinery (sampler equivalence, cache rewrite, teacher context,
DMD gradient, cadence, ODE regression, resume), which does not need trained weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from configs import CONFIG_DIR
from configs.schema import register_configs
from data.geometry import invert_rigid
from models.config import preset
from models.dit import WorldDiT
from models.layout import aligned_layout, teacher_layout, window_layout
from models.memory import MemoryConfig
from models.rollout import Rollout, RolloutConfig
from model_helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
register_configs()

SMALL = ["data.height=16", "data.width=16", "autoencoder.patch_size=4", "model.hidden=64", "model.heads=4",
         "sampling.memory.num_points=2000", "logger.progress_bar=false", "logger.wandb=false"]
MEM = MemoryConfig(temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, distance_cut=4.0, num_points=2000)


def cfg_for(experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=[f"experiment={experiment}", *SMALL, *overrides])


def write_bundle(path: Path, kind: str, seed: int) -> Path:
    """A random tiny bundle of the test model: the AR parent (``ar``) or the bidirectional teacher (``bi``)."""
    from models.bundle import save_bundle

    obj = OmegaConf.to_object(cfg_for("demo"))
    torch.manual_seed(seed)
    model = randomize(WorldDiT(obj.model), seed=seed)
    if kind == "ar":
        sampling = {**asdict(RolloutConfig(steps=4, shift=3.0, memory=MEM)), "model_type": "ar", "trained_positions": 16}
    else:
        sampling = {**asdict(RolloutConfig(mode="window", window_latents=16, memory=MEM)), "model_type": "bidirectional"}
    save_bundle(path, model, model_cfg=obj.model, autoencoder_cfg=asdict(obj.autoencoder), text_encoder_cfg=asdict(obj.text_encoder),
                sampling={**sampling, "height": 16, "width": 16}, meta={"stage": "test", "step": 0}, overwrite=True)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill_bundles")
    return {"parent": write_bundle(root / "parent", "ar", 1), "teacher": write_bundle(root / "teacher", "bi", 2)}


def distill_cfg(data: Path, bundles: dict[str, Path], *overrides: str):
    return cfg_for("demo_distill", f"data.path={data}", f"init={bundles['parent']}", f"stage.teacher={bundles['teacher']}",
                   "stage.history_curriculum=[[0,8]]", *overrides)


def make_trainer(cfg, out: Path):
    """The run's trainer as ``train.run.run`` builds it (not set up)."""
    from train.run import import_stage_packages
    from train.stage import build_stage
    from train.trainer import Trainer

    obj = OmegaConf.to_object(cfg)
    import_stage_packages()
    return Trainer(obj.trainer, build_stage(obj.stage.name, obj), out, optim=obj.optim, schedule=obj.schedule, dist=obj.dist,
                   logger=obj.logger, checkpoint=obj.checkpoint)


def setup_trainer(cfg, out: Path):
    """The run's trainer, set up (roles built and wrapped, data, resume) but not fitted."""
    trainer = make_trainer(cfg, out)
    trainer.setup()
    return trainer


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# The teacher context
# ------------------------------------------------------------------------------------------------


def test_aligned_layout_is_the_union_of_chunk_memories_minus_the_window():
    # A window of 4 chunks at latents 16..31; each chunk's memory as an AR student would hold it.
    contexts = [
        torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]),  # anchor + retrieved 8..11 + recent 12..15
        torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19]),  # retrieved 4..7, recent = the window's first chunk
        torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23]),
        torch.tensor([0, 1, 2, 3, 24, 25, 26, 27]),  # only window latents besides the anchor
    ]
    lay = aligned_layout(contexts, 16, 16)
    expect_ctx = list(range(16))  # 0..15: the union of the memories, without 16..27 (the window)
    assert lay.num_context == 16
    assert lay.indices[0].tolist() == expect_ctx + list(range(16, 32))
    assert lay.positions[0].tolist() == list(range(32))  # contiguous: reframed context, then the window
    assert lay.loss_mask[0].tolist() == [0.0] * 16 + [1.0] * 16
    sparse = aligned_layout([torch.tensor([0, 1, 2, 3, 20, 21]), torch.tensor([8, 9, 10, 11, 24])], 24, 8)
    assert sparse.indices[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 24, 25, 26, 27, 28, 29, 30, 31]
    assert sparse.positions[0].tolist() == list(range(18))
    empty = aligned_layout([torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])], 0, 8)
    assert empty.num_context == 0 and empty.image_mask[0, 0]  # a window from latent 0 holds the pinned image
    with pytest.raises(ValueError, match="before the window's end"):
        aligned_layout([torch.tensor([40])], 16, 16)


def _walk(T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """actions, w2c, K of a camera that walks out, turns and comes back (so memory retrieves far chunks)."""
    from data.actions import MotionSteps, keys_to_poses
    from data.poseio import parse_pose_string

    keys = parse_pose_string(f"w-{T // 3}, right-{T // 6}, s-{T // 3}, left-{T - T // 3 - T // 6 - T // 3 - 1}")
    c2w = keys_to_poses(keys, MotionSteps(0.25, 12.0)).float()[:T]
    K = torch.tensor([[0.9, 0, 0.5], [0, 0.9, 0.5], [0, 0, 1.0]]).expand(T, 3, 3)
    return torch.zeros(1, T, dtype=torch.long), invert_rigid(c2w)[None], K[None].clone()


def test_aligned_context_of_a_student_rollout_is_the_teachers_training_layout():
    """The union of the memories the student's chunks actually used equals teacher_layout over the same poses
    (the layout the bidirectional teacher is mid-trained on), and holds more than one chunk's memory."""
    from distill.self_rollout import self_rollout, teacher_layouts

    torch.manual_seed(0)
    model = randomize(WorldDiT(replace(preset("tiny"), latent_channels=16))).eval()
    actions, w2c, K = _walk(40)
    x0 = torch.randn(1, 16, 40, 4, 4)
    rollout = Rollout(model, RolloutConfig(schedule="distilled", memory=MEM))
    sr = self_rollout(rollout, x0, actions, w2c, K, history=24, chunks=4, exit_step=1, generator=torch.Generator().manual_seed(0), grad=False)
    (lay,) = teacher_layouts(sr, "aligned")
    c2w = invert_rigid(w2c[0])
    ref = teacher_layout(c2w[:24], c2w[24:40], MEM)
    assert torch.equal(lay.indices, ref.indices) and torch.equal(lay.positions, ref.positions)
    union = set(lay.context_idx[0].tolist())
    assert all(set(r.context_idx[0].tolist()) - set(range(24, 40)) <= union for r in sr.records)
    assert len(union) > max(len(set(r.context_idx[0].tolist()) - set(range(24, 40))) for r in sr.records)
    (win,) = teacher_layouts(sr, "window")
    assert win.num_context == 0 and win.indices[0].tolist() == list(range(24, 40))


# ------------------------------------------------------------------------------------------------
# The self-rollout
# ------------------------------------------------------------------------------------------------


class Spy:
    """The sampler's view of a model, recording each forward (grad mode, x) and each context fill (grad mode, x)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, bool, torch.Tensor]] = []

    def __call__(self, x, sigma, **kw):
        self.calls.append(("forward", torch.is_grad_enabled(), x.detach().clone()))
        return self.inner(x, sigma, **kw)

    def fill_context_cache(self, cache, **kw):
        self.calls.append(("context", torch.is_grad_enabled(), kw["x"]))
        return self.inner.fill_context_cache(cache, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_cache_is_rewritten_from_the_clean_output_and_grad_flows_through_the_exit_step_only():
    from distill.self_rollout import self_rollout

    torch.manual_seed(0)
    model = randomize(WorldDiT(replace(preset("tiny"), latent_channels=16)))
    spy = Spy(model)
    actions, w2c, K = _walk(24)
    x0 = torch.randn(1, 16, 24, 4, 4)
    exit_step = 1
    sr = self_rollout(Rollout(spy, RolloutConfig(schedule="distilled", memory=MEM)), x0, actions, w2c, K, history=8, chunks=4,
                      exit_step=exit_step, generator=torch.Generator().manual_seed(3), grad=True)
    forwards = [c for c in spy.calls if c[0] == "forward"]
    fills = [c for c in spy.calls if c[0] == "context"]
    assert len(forwards) == 4 * (exit_step + 1) and len(fills) == 4
    # gradients: only each chunk's exit-step call, never a cache fill
    assert [c[1] for c in forwards] == [False, True] * 4
    assert not any(c[1] for c in fills) and not any(c[2].requires_grad for c in fills)
    assert all(r.latents.requires_grad for r in sr.records)
    for i in range(1, 4):
        prev = sr.records[i - 1]
        ctx = sr.records[i].context_idx[0].tolist()
        slots = [ctx.index(j) for j in range(prev.start, prev.start + 4)]  # the previous chunk is in the recent memory
        cached = fills[i][2][:, :, slots]
        exit_input = forwards[(i - 1) * (exit_step + 1) + exit_step][2]
        assert torch.equal(cached, prev.latents.detach())  # the clean prediction x̂0 at the exit step ...
        assert not torch.allclose(cached, exit_input, atol=1e-3)  # ... not the noisy input of that step
    sr.window.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_self_rollout_gradients_are_the_same_with_activation_checkpointing():
    """Checkpointed blocks re-run each chunk's exit call in backward from that chunk's KV cache: later chunks must
    not have refilled it (the sampler gives each chunk that kept a graph fresh caches)."""
    from distill.self_rollout import self_rollout

    actions, w2c, K = (t.expand(2, *t.shape[1:]) for t in _walk(24))
    x0 = torch.randn(2, 16, 24, 4, 4, generator=torch.Generator().manual_seed(1))

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = randomize(WorldDiT(replace(preset("tiny"), latent_channels=16, grad_checkpointing=checkpointing)))
        sr = self_rollout(Rollout(model, RolloutConfig(schedule="distilled", memory=MEM)), x0, actions, w2c, K, history=8,
                          chunks=4, exit_step=2, generator=torch.Generator().manual_seed(5), grad=True)
        sr.window.pow(2).sum().backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# DMD
# ------------------------------------------------------------------------------------------------


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    from distill.dmd import dmd_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    loss, _ = dmd_loss(x, real, fake, mask)
    loss.backward()
    m = mask[:, None, :, None, None].float().expand_as(x)
    norm = ((x.detach() - real).abs() * m).sum((1, 2, 3, 4)) / m.sum((1, 2, 3, 4))
    expect = (fake - real) / norm.view(-1, 1, 1, 1, 1) * m / m.sum()
    torch.testing.assert_close(x.grad, expect)
    assert torch.all(x.grad[0, :, 0] == 0)  # the pinned image latent gets nothing
    x.grad = None
    loss0, _ = dmd_loss(x, real, real.clone(), mask)
    loss0.backward()
    assert loss0.item() == 0.0 and torch.all(x.grad == 0)


def test_dmd_generator_gradient_is_zero_when_fake_score_equals_real_score(long_clips, bundles, tmp_path):
    """At initialisation the fake score is the teacher: with guidance 1 the student's DMD gradient is exactly zero;
    once the fake score differs it is not."""
    trainer = setup_trainer(distill_cfg(long_clips, bundles, "stage.real_guidance=1.0", "stage.teacher_dtype=float32"), tmp_path)
    stage = trainer.stage
    batch = next(trainer.data_iter)
    from train.stages.inputs import encode_video

    def student_grads(step: int) -> list[torch.Tensor]:
        for p in stage.models["student"].parameters():
            p.grad = None
        out = stage.generator_losses(batch, encode_video(stage.autoencoder, batch, stage.device), step)
        out.losses["student"].backward()
        return [p.grad for p in stage.models["student"].parameters() if p.grad is not None]

    grads = student_grads(5)
    assert grads and all(torch.all(g == 0) for g in grads)
    with torch.no_grad():
        for p in stage.models["fake_score"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = student_grads(10)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in stage.models["fake_score"].parameters())  # the generator loss reaches the student only


def test_activation_checkpointing_changes_nothing_but_memory(long_clips, bundles, tmp_path):
    """dist.activation_checkpointing=true (student and fake score blocks recomputed in backward) gives the same
    generator and critic gradients as without it."""
    from train.stages.inputs import encode_video

    def grads(tag: str, *extra: str) -> dict[str, torch.Tensor]:
        trainer = setup_trainer(distill_cfg(long_clips, bundles, "stage.real_guidance=2.0", *extra), tmp_path / tag)
        stage = trainer.stage
        batch = next(trainer.data_iter)
        x0 = encode_video(stage.autoencoder, batch, stage.device)
        torch.manual_seed(0)
        (stage.generator_losses(batch, x0, 5).losses["student"] + stage.critic_losses(batch, x0, 5).losses["fake_score"]).backward()
        return {f"{r}.{k}".replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for r in ("student", "fake_score")
                for k, p in trainer.roles[r].wrapped.raw.named_parameters() if p.grad is not None}

    plain, ckpt = grads("plain"), grads("ckpt", "dist.activation_checkpointing=true")
    assert plain.keys() == ckpt.keys() and any(k.startswith("student.") for k in plain) and any(k.startswith("fake_score.") for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_critic_generator_cadence(long_clips, bundles, tmp_path):
    trainer = setup_trainer(distill_cfg(long_clips, bundles, "stage.generator_every=3", "stage.ema_start=0"), tmp_path)
    stage = trainer.stage
    student, fake = stage.models["student"], stage.models["fake_score"]
    for step in range(1, 7):
        s0, f0 = params(student), params(fake)
        out = stage.run_step(trainer, trainer.data_iter, step)
        gen = step % 3 == 0
        assert stage.roles_to_update(step) == (["fake_score", "student"] if gen else ["fake_score"])
        assert sorted(out.losses) == (["fake_score", "student"] if gen else ["fake_score"])
        assert same(params(student), s0) != gen, step  # the student moves on generator steps only
        assert not same(params(fake), f0), step  # the critic moves every step
        assert ("time/gen_rollout" in out.metrics) == gen and "time/critic_backward" in out.metrics


def test_self_rollout_without_grad_equals_the_inference_sampler(long_clips, bundles, tmp_path):
    """A 6-step distillation run exports a 4-step bundle; the stage's self-rollout (grads off, exit at the last
    step) equals the bundle's own sampler (the inference sampling section) for the same seed."""
    from distill.stage import RolloutPlan
    from models.bundle import load_bundle
    from models.sampling import split_sampling
    from train.run import run
    from train.stages.inputs import encode_video

    cfg = distill_cfg(long_clips, bundles, "trainer.steps=6", "stage.generator_every=3", "checkpoint.every=0")
    result = run(cfg, tmp_path / "run")
    assert result.status == "completed" and result.step == 6
    bundle = load_bundle(tmp_path / "run" / "export" / "bundle", weights="raw")
    rcfg, video = split_sampling(bundle.sampling, "test")
    assert rcfg.schedule == "distilled" and rcfg.use_renoise and rcfg.guidance == 1.0 and video["model_type"] == "ar"
    meta = bundle.meta
    assert meta["stage"] == "distill" and meta["parent"]["path"] == str(bundles["parent"].resolve())
    assert meta["teacher"]["path"] == str(bundles["teacher"].resolve()) and meta["distill"]["teacher_context"] == "aligned"

    trainer = setup_trainer(distill_cfg(long_clips, bundles), tmp_path / "fresh")
    stage = trainer.stage
    stage.models["student"].load_state_dict(bundle.model.state_dict())
    batch = next(trainer.data_iter)
    x0 = encode_video(stage.autoencoder, batch, stage.device)
    with torch.no_grad():
        sr = stage.student_rollout(batch, x0, RolloutPlan(history=8, exit_step=3), grad=False, generator=torch.Generator().manual_seed(7))
        ref = Rollout(bundle.model, rcfg)
        state = ref.start(x0[:, :, 0])
        ref.extend(state, x0[:, :, :8], batch["actions"][:, :8], batch["w2c"][:, :8], batch["K"][:, :8])
        g = torch.Generator().manual_seed(7)
        for s in range(8, 24, 4):
            ref.step(state, batch["actions"][:, s : s + 4], batch["w2c"][:, s : s + 4], batch["K"][:, s : s + 4], g)
    assert torch.equal(sr.window, state.latents[:, :, 8:24])
    assert torch.equal(sr.state.latents, state.latents)


def test_resume_is_exact(long_clips, bundles, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6: student, fake score, both optimizers, EMA, the stage's
    generators (rollout noise, DMD levels, history/exit plan) and the logged losses."""

    def states(trainer) -> dict[str, torch.Tensor]:
        out = {}
        for name, r in trainer.roles.items():
            out.update({f"{name}/model/{k}": v for k, v in r.wrapped.raw.state_dict().items()})
            if r.wrapped.optimizer is not None:
                for pid, st in r.wrapped.optimizer.state_dict()["state"].items():
                    out.update({f"{name}/optim/{pid}/{k}": v for k, v in st.items()})
            if r.ema is not None:
                out.update({f"{name}/ema/{k}": v for k, v in r.ema.shadow.items()})
        stage = trainer.stage.state_dict()
        out.update({f"stage/{k}": v for k, v in stage.items()})
        return out

    common = ["stage.generator_every=2", "stage.ema_start=0", "checkpoint.every=3", "trainer.export=false", "logger.log_every=1"]
    straight = make_trainer(distill_cfg(long_clips, bundles, "trainer.steps=6", *common), tmp_path / "straight")
    assert straight.fit().status == "completed"
    assert make_trainer(distill_cfg(long_clips, bundles, "trainer.steps=3", *common), tmp_path / "resumed").fit().step == 3
    resumed = make_trainer(distill_cfg(long_clips, bundles, "trainer.steps=6", "checkpoint.resume=latest", *common), tmp_path / "resumed")
    assert resumed.fit().status == "completed"
    a, b = states(straight), states(resumed)
    assert a.keys() == b.keys() and any(k.startswith("fake_score/optim") for k in a) and any("/ema/" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    rows = lambda d: {r["step"]: (r.get("loss"), r.get("loss/student")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    ra, rb = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert all(ra[k] == rb[k] for k in (4, 5, 6)) and ra[6][1] is not None  # step 6 updated the student too


# ------------------------------------------------------------------------------------------------
# ODE initialisation
# ------------------------------------------------------------------------------------------------


def test_trajectory_levels_lie_on_the_euler_path():
    from distill.ode_pairs import trajectory_levels

    torch.manual_seed(0)
    model = randomize(WorldDiT(replace(preset("tiny"), latent_channels=16))).eval()
    actions, w2c, K = _walk(8)
    rollout = Rollout(model, RolloutConfig(steps=6, shift=3.0, memory=MEM))
    state = rollout.start(torch.randn(1, 16, 4, 4))
    with torch.no_grad():
        rollout.step(state, actions[:, :4], w2c[:, :4], K[:, :4], torch.Generator().manual_seed(0))
        rec = rollout.step(state, actions[:, 4:], w2c[:, 4:], K[:, 4:], torch.Generator().manual_seed(1), return_trajectory=True)
    traj, sig = rec.trajectory, rec.trajectory.sigma
    on_grid = trajectory_levels(traj, [1.0, float(sig[2])])
    assert torch.equal(on_grid[0], traj.x[0]) and torch.equal(on_grid[1], traj.x[2])
    mid = 0.5 * (float(sig[3]) + float(sig[4]))
    between = trajectory_levels(traj, [mid])[0]
    torch.testing.assert_close(between, 0.5 * (traj.x[3] + traj.x[4]), rtol=1e-5, atol=1e-5)  # Euler steps are straight
    end = traj.x[-1] - float(sig[-1]) * traj.v[-1]  # the path's end at sigma 0 is the chunk's output
    torch.testing.assert_close(end, rec.latents, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        trajectory_levels(traj, [0.0])


def test_ode_init_pairs_resume_and_the_regression_loss_falls(long_clips, bundles, tmp_path):
    from models.bundle import load_bundle
    from train.run import run

    pairs = tmp_path / "pairs"
    cfg = cfg_for("demo_ode_init", f"data.path={long_clips}", f"init={bundles['parent']}", f"stage.pairs_dir={pairs}",
                  "stage.num_shards=2", "stage.max_history_latents=8", "trainer.steps=40", "optim.lr=2e-3", "logger.log_every=5",
                  "checkpoint.every=0", "stage.ema_decay=0")
    run(cfg, tmp_path / "run")
    manifest = json.loads((pairs / "manifest.json").read_text())
    assert manifest["levels"] == pytest.approx([1.0, 0.9375, 0.8333, 0.625]) and manifest["teacher"]["path"] == str(bundles["parent"].resolve())
    shard = torch.load(pairs / "shard_000001.pt", weights_only=True)
    G, n = 2, 4
    assert shard["states"].shape[:3] == (G, n, 4) and shard["latents"].shape[2] == shard["history"] + n * 4
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < 0.7 * losses[0], losses
    bundle = load_bundle(tmp_path / "run" / "export" / "bundle")
    assert bundle.sampling["schedule"] == "distilled" and bundle.meta["stage"] == "ode_init"
    assert bundle.meta["ode_teacher"]["path"] == str(bundles["parent"].resolve())
    # resumable pairs: a lost shard is regenerated bit for bit; a different spec is refused
    before = (pairs / "shard_000000.pt").read_bytes()
    ref = torch.load(pairs / "shard_000000.pt", weights_only=True)
    (pairs / "shard_000000.pt").unlink()
    run(cfg_for("demo_ode_init", f"data.path={long_clips}", f"init={bundles['parent']}", f"stage.pairs_dir={pairs}",
                "stage.num_shards=2", "stage.max_history_latents=8", "trainer.steps=1", "checkpoint.every=0", "trainer.export=false"),
        tmp_path / "again")
    again = torch.load(pairs / "shard_000000.pt", weights_only=True)
    assert all(torch.equal(ref[k], again[k]) for k in ("latents", "states", "actions")) and len(before) > 0
    with pytest.raises(ValueError, match="different"):
        run(cfg_for("demo_ode_init", f"data.path={long_clips}", f"init={bundles['parent']}", f"stage.pairs_dir={pairs}",
                    "stage.num_shards=2", "stage.max_history_latents=4", "trainer.steps=1"), tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["demo_teacher", "demo_ode_init", "demo_distill", "gpu_small_teacher", "gpu_small_ode_init", "gpu_small_distill"])
def test_experiments_compose_and_validate(experiment):
    from configs.schema import compose_checked

    _, obj = compose_checked([f"experiment={experiment}"])
    if experiment.endswith("teacher"):
        assert obj.stage.name == "midtrain" and obj.stage.mode == "bidirectional" and obj.data.batch_size == 1
        assert obj.sampling.window_latents == 4 * obj.stage.chunk_size
    else:
        assert obj.stage.name in ("ode_init", "distill") and obj.stage.mode == "causal"


def test_bad_distill_configs_fail_clearly(long_clips, bundles, tmp_path):
    from configs.schema import ConfigError, compose_checked
    from train.run import run

    with pytest.raises(ConfigError, match="teacher_context"):
        compose_checked(["experiment=demo_distill", "stage.teacher_context=bogus"])
    with pytest.raises(ValueError, match="stage.teacher"):
        run(cfg_for("demo_distill", f"data.path={long_clips}", f"init={bundles['parent']}", "trainer.steps=1"), tmp_path / "a")
    with pytest.raises(ValueError, match="bidirectional"):
        run(distill_cfg(long_clips, {**bundles, "teacher": bundles["parent"]}, "trainer.steps=1"), tmp_path / "b")
    with pytest.raises(ValueError, match="window"):
        run(distill_cfg(long_clips, bundles, "stage.rollout_chunks=2", "trainer.steps=1"), tmp_path / "c")
