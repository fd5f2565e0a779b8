"""Distributed backends on CPU (gloo, 2 processes through torchrun) against one process, and launch env.

Each backend runs the regression stage with the same *global* batch as a single-process reference;
the ResumableLoader gives both the same samples per step. Tolerance: losses rtol 1e-5, weights
atol 1e-5 — only fp32 reduction order differs (measured differences ~1e-7).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_worker import RegressionConfig, make_trainer, read_losses
from train.config import OptimConfig
from train.distributed import free_port, launch_env, slurm_env

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def torchrun(out: Path, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(WORKER), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def reference(out: Path, *, steps: int, batch_size: int, grad_accum: int = 1, optim: str = "adamw", ema: float | None = 0.9, every: int = 0, inject_at: int = 0) -> dict:
    """The single-process run of the same global batch; returns the student's (and EMA) weights."""
    cfg = RegressionConfig(batch_size=batch_size, aug_std=0.0, ema_decay=ema, inject_at=inject_at)
    trainer = make_trainer(out, steps=steps, stage_cfg=cfg, grad_accum=grad_accum, optim=OptimConfig(name=optim, lr=1e-2, weight_decay=0.01), every=every)
    trainer.fit()
    state = {"student": trainer.full_state_dict("student")}
    if ema:
        state["student_ema"] = trainer.full_state_dict("student", ema=True)
    return state


def assert_close_runs(run_dir: Path, dump: dict, ref_dir: Path, ref: dict) -> None:
    a, b = read_losses(run_dir), read_losses(ref_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=LOSS_RTOL, nan_ok=True), (step, a[step], b[step])
    assert dump.keys() == ref.keys()
    for role in dump:
        assert dump[role].keys() == ref[role].keys()
        for k in dump[role]:
            assert torch.allclose(dump[role][k].float(), ref[role][k].float(), atol=WEIGHT_ATOL, rtol=0), (role, k, (dump[role][k] - ref[role][k]).abs().max())


# --- launch environment ----------------------------------------------------------------------------


def test_slurm_env(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no scontrol: the built-in parser
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456", "SLURM_NODELIST": "gpu[07-09,12],cpu1"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_env({**env, "SLURM_NODELIST": "node-a,node-b", "MASTER_PORT": "4242"}) == {**slurm_env(env), "MASTER_ADDR": "node-a", "MASTER_PORT": "4242"}
    assert slurm_env({**env, "SLURM_STEP_NODELIST": "x[3-4]"})["MASTER_ADDR"] == "x3"  # the step's nodes win
    assert slurm_env({"SLURM_JOB_ID": "1"}) is None  # not inside a task


def test_slurm_env_uses_scontrol(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="nodeB\nnodeC\n", stderr="")

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "node[B-C]"})["MASTER_ADDR"] == "nodeB"
    assert calls == [["scontrol", "show", "hostnames", "node[B-C]"]]


def test_launch_env_prefers_torchrun():
    torchrun_vars = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env({**torchrun_vars, "SLURM_PROCID": "7", "SLURM_NTASKS": "16"}) == torchrun_vars
    assert launch_env({}) is None


# --- backends against one process ------------------------------------------------------------------


def test_ddp_matches_single_process(tmp_path):
    """DDP with gradient accumulation (no_sync on the first micro-batch) and EMA; a NaN gradient on
    rank 1 alone at step 3 makes *both* ranks skip that update, as the single process does."""
    torchrun(tmp_path / "ddp", "--backend", "ddp", "--steps", "5", "--batch-size", "2", "--grad-accum", "2", "--inject-at", "3", "--inject-rank", "1", "--dump", str(tmp_path / "ddp.pt"))
    ref = reference(tmp_path / "ref", steps=5, batch_size=4, grad_accum=2, inject_at=3)
    assert_close_runs(tmp_path / "ddp", torch.load(tmp_path / "ddp.pt"), tmp_path / "ref", ref)
    assert read_losses(tmp_path / "ddp", "skipped/student") == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}


def test_fsdp_muon_matches_and_resumes_on_one_process(tmp_path):
    """FSDP2 (per-block sharding) with Muon on DTensors and a sharded EMA; its 2-process checkpoint
    resumes in a 1-process FSDP2 run that ends where the single-process reference does."""
    torchrun(tmp_path / "fsdp", "--backend", "fsdp", "--optim", "muon", "--steps", "6", "--batch-size", "4", "--every", "3", "--dump", str(tmp_path / "fsdp.pt"))
    ref = reference(tmp_path / "ref", steps=6, batch_size=8, optim="muon")
    assert_close_runs(tmp_path / "fsdp", torch.load(tmp_path / "fsdp.pt"), tmp_path / "ref", ref)

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp" / "ckpt" / "step_000003", resumed_dir / "ckpt" / "step_000003")
    cfg = RegressionConfig(batch_size=8, aug_std=0.0)
    one = make_trainer(resumed_dir, steps=6, stage_cfg=cfg, backend="fsdp", optim=OptimConfig(name="muon", lr=1e-2, weight_decay=0.01), resume="latest")
    with pytest.warns(UserWarning, match="saved with 2 ranks, resuming with 1"):
        assert one.fit().status == "completed"
    assert one.env.world_size == 1 and sorted(read_losses(resumed_dir)) == [4, 5, 6]
    dump = {"student": one.full_state_dict("student"), "student_ema": one.full_state_dict("student", ema=True)}
    ref_losses = read_losses(tmp_path / "ref")
    for step, loss in read_losses(resumed_dir).items():
        assert loss == pytest.approx(ref_losses[step], rel=LOSS_RTOL)
    for role in ref:
        for k in ref[role]:
            assert torch.allclose(dump[role][k], ref[role][k], atol=WEIGHT_ATOL, rtol=0), (role, k)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_single_process(tmp_path, stage):
    """ZeRO-2 (with EMA) and ZeRO-3, caller-owned gradient accumulation over 2 micro-batches."""
    ema = "0.9" if stage == 2 else "0"
    torchrun(tmp_path / "ds", "--backend", f"deepspeed_zero{stage}", "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--ema", ema, "--every", "2", "--dump", str(tmp_path / "ds.pt"))
    ref = reference(tmp_path / "ref", steps=4, batch_size=8, grad_accum=2, ema=float(ema) or None)
    assert_close_runs(tmp_path / "ds", torch.load(tmp_path / "ds.pt"), tmp_path / "ref", ref)
    if stage == 2:  # the engine's own checkpoint (+ ema.pt) resumes bit-for-bit on the same world size
        resumed = tmp_path / "resumed"
        (resumed / "ckpt").mkdir(parents=True)
        shutil.copytree(tmp_path / "ds" / "ckpt" / "step_000002", resumed / "ckpt" / "step_000002")
        torchrun(resumed, "--backend", "deepspeed_zero2", "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--ema", ema, "--resume", "latest", "--dump", str(tmp_path / "resumed.pt"))
        a, b = torch.load(tmp_path / "ds.pt"), torch.load(tmp_path / "resumed.pt")
        assert all(torch.equal(a[r][k], b[r][k]) for r in a for k in a[r])


def test_deepspeed_rejects_what_it_cannot_do(tmp_path):
    from train.config import DistConfig
    from train.distributed import DeepSpeedBackend, DistEnv

    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # no process group needed for the checks
    backend.cfg, backend.env, backend.bf16, backend.zero_stage, backend.name = DistConfig(backend="deepspeed_zero2"), DistEnv(), False, 2, "deepspeed_zero2"
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optim.name=muon is not supported with dist.backend=deepspeed_zero2"):
        backend.wrap("student", module, True, OptimConfig(name="muon"), True)
    with pytest.raises(ValueError, match="spike_threshold is not supported"):
        backend.wrap("student", module, True, OptimConfig(spike_threshold=10.0), True)
    cfg = backend.config(OptimConfig(lr=3e-4, grad_clip=0.5))
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["gradient_clipping"] == 0.5
    assert cfg["managed_gradient_accumulation"] is False and cfg["zero_optimization"]["stage"] == 2
