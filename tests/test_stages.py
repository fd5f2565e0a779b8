"""The pretrain and mid-train stages through the real entry point (Hydra compose -> train.run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.schema import register_configs

register_configs()


def cfg_for(experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=[f"experiment={experiment}", "logger.progress_bar=false", *overrides])


def losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


SMALL = ["data.height=16", "data.width=16", "autoencoder.patch_size=4", "model.hidden=64", "model.heads=4", "checkpoint.every=0"]


def test_pretrain_overfits_two_clips_and_exports(two_clips, tmp_path):
    from models.bundle import load_bundle
    from train.run import run

    cfg = cfg_for(
        "demo", f"data.path={two_clips}", *SMALL, "data.num_latents=8", "data.batch_size=2", "data.window=start",
        "trainer.steps=120", "logger.log_every=10", "optim.lr=3e-3", "stage.text_dropout=0", "stage.action_dropout=0",
        "stage.camera_dropout=0", "schedule.warmup_steps=5",
    )
    result = run(cfg, tmp_path / "run")
    assert result.status == "completed" and result.step == 120
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.5 * curve[0], curve
    bundle = load_bundle(tmp_path / "run" / "export" / "bundle")
    assert bundle.meta["stage"] == "pretrain" and bundle.meta["step"] == 120
    assert bundle.sampling["height"] == 16 and bundle.sampling["model_type"] == "ar"
    assert (tmp_path / "run" / "config.yaml").exists()


def test_midtrain_sample_holds_the_samplers_context(long_clips):
    """A memory sample packs exactly the context the rollout sampler would choose for that chunk."""
    from models.memory import select_context
    from train.data import DataConfig, build_train_loader
    from train.stage import StageContext
    from train.stages.midtrain import Midtrain
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(cfg_for("demo_midtrain", f"data.path={long_clips}", *SMALL, "stage.memory_prob=1.0", "stage.self_history_prob=0",
                                      "stage.curriculum=[[0,24]]"))
    stage = Midtrain(cfg)
    stage.build(StageContext(device=torch.device("cpu"), rank=0, world_size=1, seed=0, out_dir=Path("."), compute_dtype=torch.float32))
    stage.device = torch.device("cpu")
    loader = build_train_loader(DataConfig(**{**cfg.data.__dict__, "window": "start", "batch_size": 2}), 4, seed=0)
    batch = next(loader)
    x0 = torch.randn(2, 48, 24, 4, 4)  # latent identity is what matters: gathered latents are compared below
    inp = stage.make_inputs(batch, x0, step=0)
    mem = stage.mem
    assert inp.x0.shape[2] == mem.max_context + mem.chunk_size
    for b in range(2):
        target = inp.loss_mask[b].nonzero().flatten()
        assert len(target) == mem.chunk_size
        # recover which clip latents were packed, by value
        packed = [int((x0[b].permute(1, 0, 2, 3) == inp.x0[b, :, i][None]).flatten(1).all(1).nonzero()) for i in range(inp.x0.shape[2])]
        cur = packed[int(target[0])]
        expect = select_context(batch["c2w"][b, :cur].double(), batch["c2w"][b, cur : cur + mem.chunk_size].double(), mem)
        assert packed[: mem.max_context] == expect.tolist()
        assert inp.t_pos[b].tolist() == list(range(mem.max_context + mem.chunk_size))
        assert bool(inp.cond_mask[b, 0]) == (packed[0] == 0)
        assert torch.all(inp.sigma[b, : mem.max_context] == 0)  # clean context, like the sampler's cache


def test_midtrain_self_history_is_the_samplers_own_rollout(long_clips):
    """With self_history_prob=1 the recent context of a memory sample is what the inference sampler makes
    from the true history before it (same noise), and the target chunk stays the true latents."""
    from dataclasses import replace as dc_replace

    from models.rollout import Rollout, RolloutConfig
    from omegaconf import OmegaConf
    from train.data import DataConfig, build_train_loader
    from train.stage import StageContext
    from train.stages.midtrain import Midtrain

    over = ["stage.memory_prob=1.0", "stage.self_history_prob=1.0", "stage.self_history_steps=2", "stage.curriculum=[[0,24]]"]
    cfg = OmegaConf.to_object(cfg_for("demo_midtrain", f"data.path={long_clips}", *SMALL, *over))
    stage = Midtrain(cfg)
    roles = stage.build(StageContext(device=torch.device("cpu"), rank=0, world_size=1, seed=0, out_dir=Path("."), compute_dtype=torch.float32))
    stage.device = torch.device("cpu")
    model = roles["student"].module.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial function (the init zeroes the output layer)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stage.models = {"student": model}
    batch = next(build_train_loader(DataConfig(**{**cfg.data.__dict__, "window": "start", "batch_size": 2}), 1, seed=0))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 48, 24, 4, 4, generator=g)
    layout_state, noise_state = stage.layout_rng.get_state(), stage.generator.get_state()
    inp = stage.make_inputs(batch, x0, step=0)
    # Redo the choices: the shared target, then the rollout with the stage's noise stream.
    stage.layout_rng.set_state(layout_state)
    torch.rand((), generator=stage.layout_rng)
    C, M, n = 4, stage.mem.max_context, stage.mem.temporal_latents
    starts = list(range(M, 24 - C + 1, C))
    cur = starts[int(torch.randint(len(starts), (), generator=stage.layout_rng))]
    gen = torch.Generator().set_state(noise_state)
    ro = Rollout(model, dc_replace(stage.rollout_config(), schedule="euler", steps=2, guidance=1.0))
    state = ro.start(x0[:, :, 0])
    start = cur - n
    ro.extend(state, x0[:, :, :start], batch["actions"][:, :start], batch["w2c"][:, :start].float(), batch["K"][:, :start].float())
    for s in range(start, cur, C):
        ro.step(state, batch["actions"][:, s : s + C], batch["w2c"][:, s : s + C].float(), batch["K"][:, s : s + C].float(), generator=gen)
    for b in range(2):
        lay_idx = inp.t_pos[b]  # positions 0..M+C-1; which clip latents: recover the target from the loss mask
        target = inp.loss_mask[b].nonzero().flatten()
        assert torch.equal(inp.x0[b][:, target], x0[b, :, cur : cur + C])  # the targets are true latents
        recent = inp.x0[b][:, M - n : M]  # the context's last n slots are latents cur-n..cur-1
        assert torch.allclose(recent, state.latents[b, :, start:cur], atol=1e-6)
        assert not torch.allclose(recent, x0[b, :, start:cur])
        assert lay_idx.tolist() == list(range(M + C))


def test_bad_config_and_missing_data_fail_clearly(tmp_path):
    from hydra.errors import ConfigCompositionException

    from train.run import run

    with pytest.raises(ConfigCompositionException) as e:
        cfg_for("demo", "optim.lrr=1")
    assert "lrr" in str(e.value.__cause__) or "lrr" in str(e.value)
    with pytest.raises(ValueError, match="narrower than a token"):
        run(cfg_for("demo", "autoencoder.temporal_patch=4", "model.latent_channels=192", "trainer.steps=1"), tmp_path / "run0")
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        run(cfg_for("demo", f"data.path={tmp_path / 'nowhere'}", "trainer.steps=1"), tmp_path / "run")


def test_dry_run_builds_and_steps_once(two_clips, tmp_path):
    from train.run import run

    result = run(cfg_for("demo", f"data.path={two_clips}", *SMALL, "data.batch_size=2", "trainer.dry_run=true"), tmp_path / "run")
    assert result.status == "dry_run"
    assert not (tmp_path / "run" / "ckpt").exists()


def test_periodic_sample_and_evaluation_are_logged(two_clips, tmp_path):
    from train.run import run

    cfg = cfg_for(
        "demo", f"data.path={two_clips}", *SMALL, "data.batch_size=2", "trainer.steps=4", "trainer.sample_every=4",
        "stage.sample_latents=8", "stage.sample_steps=2", "stage.eval_protocols=[short]", "stage.eval_num=1", "trainer.export=false",
    )
    run(cfg, tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert "sample/psnr" in logged, logged
    assert any(k.startswith("sample/eval/short/") for k in logged), logged
    assert list((tmp_path / "run" / "samples").rglob("*.mp4"))


def test_lora_stage_exports_adapter_and_an_equivalent_merged_bundle(two_clips, tmp_path):
    """base + adapter = the merged bundle, for the weights it runs (EMA) and the raw ones; infer runs base + adapter."""
    import cv2

    from infer.__main__ import main as infer_main
    from models.bundle import load_bundle
    from models.lora import merge_adapter
    from train.lora import load_adapter
    from train.run import run

    common = [f"data.path={two_clips}", *SMALL, "data.batch_size=2", "logger.log_every=1"]
    run(cfg_for("demo", *common, "trainer.steps=2"), tmp_path / "base")
    base_dir = tmp_path / "base" / "export" / "bundle"
    with pytest.warns(UserWarning, match="model_raw.safetensors holds the trained weights"):  # 3 steps of a 0.99 EMA
        run(cfg_for("demo", *common, "trainer.steps=3", f"init={base_dir}", "lora.enabled=true", "lora.rank=4", "optim.lr=5e-2"), tmp_path / "lora")
    out = tmp_path / "lora" / "export"
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "adapter" / "adapter_raw.safetensors").exists()
    assert load_bundle(out / "bundle").meta["parent"]["path"] == str(base_dir.resolve())
    assert "horizon" in load_bundle(out / "bundle").meta["ema_note"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 4, 4, 4, generator=g)
    kw = dict(actions=torch.tensor([[0, 9, 9, 1]]), w2c=torch.eye(4).expand(1, 4, 4, 4), K=torch.tensor([[0.7, 0, 0.5], [0, 0.7, 0.5], [0, 0, 1.0]]).expand(1, 4, 3, 3), chunk_size=4)
    s = torch.full((1, 4), 0.5)

    def f(model):
        with torch.no_grad():
            return model.eval()(x, s, **kw)

    base = load_bundle(base_dir).model
    for weights in ("model", "raw"):  # init= starts from the parent's weights to run (its EMA); adapters apply on top
        merged = load_bundle(out / "bundle", weights=weights).model
        assert torch.allclose(f(merged), f(load_adapter(load_bundle(base_dir).model, out / "adapter", weights)), atol=1e-5), weights
        folded = merge_adapter(load_bundle(base_dir).model, out / "adapter", weights)  # what infer --adapter does
        assert all(torch.allclose(v, merged.state_dict()[k], atol=1e-6) for k, v in folded.state_dict().items()), weights
    raw, ema = load_bundle(out / "bundle", weights="raw").model, load_bundle(out / "bundle").model
    assert not torch.equal(f(raw), f(base)) and not torch.equal(f(raw), f(ema))  # the fine-tune changed the function
    changed = [k for k, v in raw.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(".vid." in k or ".txt." in k for k in changed)  # ...through the LoRA targets only

    # python -m infer runs a base bundle plus the adapter exactly as the merged bundle
    frame = ((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())
    cv2.imwrite(str(tmp_path / "start.png"), frame)
    args = ["--image", str(tmp_path / "start.png"), "--pose", "w-3", "--weights", "raw", "--quiet", "--threads", "1"]
    assert infer_main(["--bundle", str(tmp_path / "lora"), "--out", str(tmp_path / "merged.mp4"), *args]) == 0
    assert infer_main(["--bundle", str(base_dir), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "adapted.mp4"), *args]) == 0
    m, a = (json.loads((tmp_path / f"{n}.json").read_text())["latents"] for n in ("merged", "adapted"))
    assert m == a
    from data.video import read_mp4

    diff = np.abs(read_mp4(tmp_path / "merged.mp4").astype(int) - read_mp4(tmp_path / "adapted.mp4").astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.01  # the same weights up to float rounding (measured: identical)


def test_init_from_a_bundle_of_another_shape_names_the_differing_values(tmp_path):
    from dataclasses import replace

    from models.autoencoders import AutoencoderConfig
    from models.bundle import save_bundle
    from models.config import WorldDiTConfig
    from models.dit import WorldDiT
    from models.text_encoders import TextEncoderConfig
    from omegaconf import OmegaConf
    from train.stage import StageContext
    from train.stages.pretrain import Pretrain

    cfg = OmegaConf.to_object(cfg_for("demo", "model.hidden=48", "model.heads=3", f"init={tmp_path / 'bundle'}"))
    bundle_cfg = replace(cfg.model, hidden=96, heads=6)  # the demo's model
    save_bundle(tmp_path / "bundle", WorldDiT(bundle_cfg), model_cfg=bundle_cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4),
                text_encoder_cfg=TextEncoderConfig(kind="none"), sampling={}, meta={"stage": "pretrain"})
    ctx = StageContext(device=torch.device("cpu"), rank=0, world_size=1, seed=0, out_dir=tmp_path, compute_dtype=torch.float32)
    with pytest.raises(ValueError) as e:
        Pretrain(cfg).build(ctx)
    msg = str(e.value)
    assert "hidden (bundle 96, run 48), heads (bundle 6, run 3)" in msg and "add model.hidden=96 model.heads=6" in msg
    assert "size mismatch" not in msg and len(msg.splitlines()) == 1


def test_init_from_a_bundle_that_reads_its_weights_differently_is_refused(tmp_path):
    from models.autoencoders import AutoencoderConfig
    from models.bundle import save_bundle
    from models.dit import WorldDiT
    from models.text_encoders import TextEncoderConfig
    from omegaconf import OmegaConf
    from train.stage import StageContext
    from train.stages.pretrain import Pretrain

    cfg = OmegaConf.to_object(cfg_for("demo", f"init={tmp_path / 'bundle'}"))
    bundle_cfg = dataclasses.replace(cfg.model, image_warp="patch")  # same tensors, another function of them
    save_bundle(tmp_path / "bundle", WorldDiT(bundle_cfg), model_cfg=bundle_cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4),
                text_encoder_cfg=TextEncoderConfig(kind="none"), sampling={}, meta={"stage": "pretrain"})
    ctx = StageContext(device=torch.device("cpu"), rank=0, world_size=1, seed=0, out_dir=tmp_path, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"image_warp \(bundle 'patch', run 'off'\).*add model.image_warp=patch"):
        Pretrain(cfg).build(ctx)
