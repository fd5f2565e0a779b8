"""The training loop on one CPU process: learning, exact resume, grad-spike skipping, cadences, hooks."""

import json

import pytest
import torch

from dist_worker import RegressionConfig, RegressionStage, make_trainer, read_losses
from train.config import OptimConfig
from train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler
from train.stage import Stage, StepOutput, build_stage, register_stage, registered_stages


class StopAfter(PreemptionHandler):
    """Acts as if a preemption signal arrived once the trainer reached ``n`` steps."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.trainer = n, None

    @property
    def requested(self) -> bool:
        return self.trainer is not None and self.trainer.step >= self.n

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def _states(trainer):
    """Everything that must match after resume: weights, optimizer states, EMA shadows."""
    out = {}
    for name, r in trainer.roles.items():
        for k, v in r.wrapped.raw.state_dict().items():
            out[f"{name}/model/{k}"] = v
        if r.wrapped.optimizer is not None:
            for pid, st in r.wrapped.optimizer.state_dict()["state"].items():
                for k, v in st.items():
                    out[f"{name}/optim/{pid}/{k}"] = v
        if r.ema is not None:
            for k, v in r.ema.shadow.items():
                out[f"{name}/ema/{k}"] = v
    return out


def test_loss_falls_when_overfitting(tmp_path):
    cfg = RegressionConfig(n_samples=8, batch_size=8, aug_std=0.0, ema_decay=None, hidden=32)
    trainer = make_trainer(tmp_path, steps=80, stage_cfg=cfg, optim=OptimConfig(name="adamw", lr=1e-2), log_every=1)
    result = trainer.fit()
    assert result.status == "completed" and result.step == 80 and result.exit_code == 0
    losses = read_losses(tmp_path)
    assert sorted(losses) == list(range(1, 81))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(76, 81)) / 5
    assert last < 0.05 * first, (first, last)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 80


def test_resume_is_bitwise_identical(tmp_path):
    """n steps straight == k steps, stop, resume to n: weights, both optimizers (AdamW + Muon), EMA, losses.

    Exercises grad accumulation, a shuffling loader with RNG augmentation, two trainable roles on
    different cadences with different optimizers and schedules, and a frozen role.
    """
    cfg = RegressionConfig(critic=True, critic_every=1, student_every=2, aug_std=0.1)
    straight = make_trainer(tmp_path / "a", steps=8, stage_cfg=cfg, grad_accum=2)
    assert straight.fit().status == "completed"

    stopper = StopAfter(5)
    first = make_trainer(tmp_path / "b", steps=8, stage_cfg=cfg, grad_accum=2, preemption=stopper)
    stopper.trainer = first
    stopped = first.fit()
    assert (stopped.status, stopped.step, stopped.exit_code) == ("preempted", 5, PREEMPTED_EXIT_CODE)
    assert json.loads((tmp_path / "b" / "status.json").read_text())["status"] == "preempted"

    resumed = make_trainer(tmp_path / "b", steps=8, stage_cfg=cfg, grad_accum=2, resume="latest")
    assert resumed.fit().status == "completed"

    a, b = _states(straight), _states(resumed)
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    for key in ("loss/student", "loss/critic", "grad_norm/critic", "lr/critic"):
        assert read_losses(tmp_path / "a", key) == read_losses(tmp_path / "b", key), key
    assert sorted(read_losses(tmp_path / "b", "loss/critic")) == list(range(1, 9))  # no duplicated steps
    assert resumed.data_iter.state_dict() == straight.data_iter.state_dict()


class SnapshotStage(RegressionStage):
    """Records the student's weights and optimizer state at the start of every step."""

    def run_step(self, trainer, data_iter, step):
        r = trainer.roles["student"]
        self.snapshots[step] = (
            {k: v.clone() for k, v in r.wrapped.raw.state_dict().items()},
            {pid: {k: v.clone() for k, v in st.items()} for pid, st in r.wrapped.optimizer.state_dict()["state"].items()},
            {k: v.clone() for k, v in r.ema.shadow.items()},
        )
        return super().run_step(trainer, data_iter, step)


@pytest.mark.parametrize("kind,spike", [("nan", 0.0), ("huge", 50.0)])
def test_bad_gradient_is_skipped_and_counted(tmp_path, kind, spike):
    cfg = RegressionConfig(inject_at=3, inject_kind=kind, ema_decay=0.5)
    trainer = make_trainer(tmp_path, steps=5, stage_cfg=cfg, optim=OptimConfig(name="adamw", lr=1e-2, spike_threshold=spike))
    trainer.stage = stage = SnapshotStage(cfg)
    stage.snapshots = {}
    trainer.fit()
    before, after = stage.snapshots[3], stage.snapshots[4]
    for b, a in zip(before, after):  # weights, optimizer state (incl. step count), EMA: all untouched
        assert all(torch.equal(b[k], a[k]) if isinstance(b[k], torch.Tensor) else all(torch.equal(b[k][j], a[k][j]) for j in b[k]) for k in b)
    assert not all(torch.equal(stage.snapshots[4][0][k], stage.snapshots[5][0][k]) for k in stage.snapshots[4][0])  # training went on
    skipped = read_losses(tmp_path, "skipped/student")
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}
    norm3 = read_losses(tmp_path, "grad_norm/student")[3]
    assert (norm3 != norm3) if kind == "nan" else norm3 > spike
    assert json.loads((tmp_path / "ckpt" / "step_000005" / "COMPLETE").read_text())["step"] == 5
    assert torch.load(tmp_path / "ckpt" / "step_000005" / "trainer.pt", weights_only=False)["skipped"] == {"student": 1}


def test_roles_update_on_their_own_cadence(tmp_path):
    cfg = RegressionConfig(critic=True, critic_every=1, student_every=3, ema_decay=None)
    trainer = make_trainer(tmp_path, steps=7, stage_cfg=cfg)
    trainer.fit()
    student_opt = trainer.roles["student"].wrapped.optimizer
    critic_opt = trainer.roles["critic"].wrapped.optimizer
    assert {float(s["step"]) for s in student_opt.state.values()} == {2.0}  # steps 3 and 6
    critic_steps = {float(s["step"]) for s in critic_opt.state.values() if "step" in s}
    assert critic_steps == {7.0}  # Muon's AdamW part (1-D / embed / final params) stepped every time
    assert sorted(read_losses(tmp_path, "loss/student")) == [3, 6]
    assert all(not p.requires_grad for p in trainer.roles["teacher"].wrapped.raw.parameters())


def test_dry_run_writes_no_checkpoint(tmp_path):
    result = make_trainer(tmp_path, steps=5, dry_run=True).fit()
    assert result.status == "dry_run" and result.step == 0
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_missing_role_loss_is_an_error(tmp_path):
    class Forgetful(RegressionStage):
        def compute_losses(self, batch, step):
            out = super().compute_losses(batch, step)
            return StepOutput(losses={}, metrics=out.metrics)

    trainer = make_trainer(tmp_path, steps=2)
    trainer.stage = Forgetful(RegressionConfig())
    with pytest.raises(KeyError, match=r"no loss for role\(s\) \['student'\]"):
        trainer.fit()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_sample_hook_and_export(tmp_path):
    class Sampling(RegressionStage):
        def sample(self, trainer, step, out_dir):
            out_dir.mkdir(parents=True)
            with trainer.roles["student"].ema.swapped():
                value = float(trainer.stage.models["student"](torch.zeros(1, self.cfg.dim, device=trainer.device)).item())
            (out_dir / "value.txt").write_text(str(value))
            return {"probe": value}

    trainer = make_trainer(tmp_path, steps=4, export=True)
    trainer.stage = Sampling(RegressionConfig())
    trainer.cfg.sample_every = 2
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000002", "step_000004"]
    assert set(read_losses(tmp_path, "sample/probe")) == {2, 4}
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "student.safetensors"))
    ema = trainer.roles["student"].ema.shadow
    assert exported.keys() == trainer.roles["student"].wrapped.raw.state_dict().keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the export carries the EMA weights


def test_wandb_run_id_survives_resume(tmp_path):
    pytest.importorskip("wandb")
    make_trainer(tmp_path, steps=2, wandb=True, every=2).fit()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    make_trainer(tmp_path, steps=4, wandb=True, resume="latest").fit()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = [p.name for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run")]
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)


def test_stage_registry():
    assert "test_regression" in registered_stages()
    stage = build_stage("test_regression", RegressionConfig(dim=3))
    assert isinstance(stage, RegressionStage) and stage.cfg.dim == 3 and stage.name == "test_regression"
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        build_stage("nope")
    with pytest.raises(ValueError, match="already registered"):

        @register_stage("test_regression")
        class Other(Stage):
            pass


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    plain = make_trainer(tmp_path / "plain", steps=3)
    plain.fit()
    ac = make_trainer(tmp_path / "ac", steps=3)
    ac.dist_cfg.activation_checkpointing = True
    ac.fit()
    student = ac.roles["student"].wrapped.raw
    assert all(isinstance(b, CheckpointWrapper) for b in student.blocks)
    assert not isinstance(ac.roles["teacher"].wrapped.raw.blocks[0], CheckpointWrapper)  # frozen: no backward
    a, b = plain.roles["student"].wrapped.raw.state_dict(), student.state_dict()
    assert a.keys() == b.keys()  # checkpoints stay portable between the two
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_losses(tmp_path / "plain") == read_losses(tmp_path / "ac")


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    class Probe(RegressionStage):
        def compute_losses(self, batch, step):
            self.out_dtype = self.models["student"](batch["x"]).dtype
            return super().compute_losses(batch, step)

    trainer = make_trainer(tmp_path, steps=3, precision="bf16")
    trainer.stage = Probe(RegressionConfig())
    trainer.fit()
    assert trainer.bf16 and trainer.stage.out_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.roles["student"].wrapped.raw.parameters())
    assert all(v == v for v in read_losses(tmp_path).values())
