"""Test fixtures of the trainer core: a tiny regression stage, and a CLI that runs it.

Imported by tests/test_trainer.py, test_checkpoint.py, test_distributed.py; run as a script by
``torchrun`` (distributed tests) and as a subprocess (the SIGTERM test). The stage is a real stage:
a frozen teacher MLP makes targets, a student MLP (with a ``blocks`` ModuleList, so FSDP2 shards per
block) regresses them, and an optional critic is a second trainable role on its own cadence and
optimizer. The dataset shuffles (ResumableLoader) and augments with the global torch RNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import CheckpointConfig, DistConfig, EMAConfig, LoggerConfig, OptimConfig, ScheduleConfig, TrainerConfig  # noqa: E402
from train.resumable import ResumableLoader  # noqa: E402
from train.stage import Role, Stage, StageContext, StepOutput, register_stage  # noqa: E402
from train.trainer import Trainer  # noqa: E402


class MLP(nn.Module):
    """in-projection, residual blocks, final layer (names chosen to exercise Muon's grouping)."""

    def __init__(self, dim: int, hidden: int, depth: int, out: int):
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth))
        self.final = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.final(h)


class ToyDataset(torch.utils.data.Dataset):
    """Fixed inputs; ``__getitem__`` adds augmentation noise from the global torch RNG."""

    def __init__(self, n: int, dim: int, aug_std: float, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.aug_std = aug_std

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.aug_std:
            x = x + self.aug_std * torch.randn_like(x)
        return {"x": x}


@dataclass
class RegressionConfig:
    dim: int = 8
    hidden: int = 16
    depth: int = 2
    n_samples: int = 64
    batch_size: int = 4  # per rank
    aug_std: float = 0.05
    ema_decay: Optional[float] = 0.9
    critic: bool = False  # add a second trainable role
    critic_every: int = 1  # critic updated every k steps
    student_every: int = 1  # student updated every k steps
    critic_optim: str = "muon"
    inject_at: int = 0  # step at which to inject a bad gradient into the student loss
    inject_kind: str = "nan"  # "nan" | "huge"
    inject_rank: int = -1  # only on this rank (-1: all ranks)
    sleep: float = 0.0  # seconds per step (SIGTERM test)
    ready_file: str = ""  # touched after this many steps: "<path>:<steps>"


@register_stage("test_regression")
class RegressionStage(Stage):
    cfg: RegressionConfig

    def build(self, ctx: StageContext) -> dict[str, Role]:
        c = self.cfg
        self.rank = ctx.rank
        roles = {
            "teacher": Role(MLP(c.dim, c.hidden, 1, 1), trainable=False),
            "student": Role(MLP(c.dim, c.hidden, c.depth, 1), ema=EMAConfig(decay=c.ema_decay) if c.ema_decay else None),
        }
        if c.critic:
            roles["critic"] = Role(MLP(c.dim, c.hidden, c.depth, 1), optim=OptimConfig(name=c.critic_optim, lr=3e-3, weight_decay=0.01), schedule=ScheduleConfig(kind="cosine", warmup_steps=2))
        return roles

    def build_data(self, ctx: StageContext) -> ResumableLoader:
        c = self.cfg
        return ResumableLoader(ToyDataset(c.n_samples, c.dim, c.aug_std), c.batch_size, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)

    def roles_to_update(self, step: int) -> list[str]:
        roles = ["student"] if step % self.cfg.student_every == 0 else []
        if self.cfg.critic and step % self.cfg.critic_every == 0:
            roles.append("critic")
        return roles

    def compute_losses(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        c = self.cfg
        x = batch["x"]
        with torch.no_grad():
            target = torch.sin(3 * self.models["teacher"](x))
        update = self.roles_to_update(step)
        losses, metrics = {}, {}
        if "student" in update:
            loss = (self.models["student"](x) - target).pow(2).mean()
            if step == c.inject_at and c.inject_rank in (-1, self.rank):
                loss = loss * (float("nan") if c.inject_kind == "nan" else 1e8)
            losses["student"] = loss
            metrics["student_rmse"] = loss.detach().sqrt()
        if "critic" in update:
            losses["critic"] = (self.models["critic"](x) - target.abs()).pow(2).mean()
        if c.sleep:
            time.sleep(c.sleep)
        if c.ready_file:
            path, after = c.ready_file.rsplit(":", 1)
            if step >= int(after):
                Path(path).touch()
        return StepOutput(losses=losses, metrics=metrics, tokens=x.shape[0] * c.dim)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": getattr(self, "calls", 0)}


def make_trainer(out_dir: Path, *, steps: int, stage_cfg: Optional[RegressionConfig] = None, backend: str = "none", grad_accum: int = 1, optim: Optional[OptimConfig] = None,
                 every: int = 0, keep_last: int = 0, resume: Optional[str] = None, log_every: int = 1, preemption=None, export: bool = False, dry_run: bool = False,
                 wandb: bool = False, precision: str = "fp32") -> Trainer:
    """A Trainer over :class:`RegressionStage` with test-friendly defaults (CPU, fp32, no wandb)."""
    return Trainer(
        TrainerConfig(steps=steps, grad_accum=grad_accum, seed=7, precision=precision, export=export, dry_run=dry_run),
        RegressionStage(stage_cfg or RegressionConfig()),
        out_dir,
        optim=optim or OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01),
        schedule=ScheduleConfig(warmup_steps=2, kind="linear", min_lr_ratio=0.1),
        dist=DistConfig(backend=backend),
        logger=LoggerConfig(log_every=log_every, wandb=wandb, progress_bar=False),
        checkpoint=CheckpointConfig(every=every, keep_last=keep_last, resume=resume),
        preemption=preemption,
    )


def read_losses(out_dir: Path, key: str = "loss/student") -> dict[int, float]:
    """step -> logged value from metrics.jsonl."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="run the test regression stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="none")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--aug-std", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--ready-file", default="")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--inject-at", type=int, default=0, help="NaN in the student loss at this step")
    ap.add_argument("--inject-rank", type=int, default=-1)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--dump", default="", help="write the student's (and EMA) full weights here (rank 0)")
    args = ap.parse_args()
    stage_cfg = RegressionConfig(batch_size=args.batch_size, aug_std=args.aug_std, ema_decay=args.ema or None, sleep=args.sleep, ready_file=args.ready_file,
                                 inject_at=args.inject_at, inject_rank=args.inject_rank)
    trainer = make_trainer(Path(args.out), steps=args.steps, stage_cfg=stage_cfg, backend=args.backend, grad_accum=args.grad_accum,
                           optim=OptimConfig(name=args.optim, lr=1e-2, weight_decay=0.01), every=args.every, resume=args.resume,
                           precision=args.precision, log_every=args.log_every)
    if args.dump:
        stage = trainer.stage
        original_export = stage.export

        def export(tr: Trainer, out_dir: Path) -> None:  # gather on all ranks, write on rank 0
            state = {"student": tr.full_state_dict("student")}
            if tr.has_ema("student"):
                state["student_ema"] = tr.full_state_dict("student", ema=True)
            if tr.env.is_main:
                torch.save(state, args.dump)
            original_export(tr, out_dir)

        stage.export = export  # type: ignore[method-assign]
        trainer.cfg.export = True
    result = trainer.fit()
    return result.exit_code


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: a DeepSpeed ZeRO-3 helper thread still alive there can abort the
    # process ("terminate called without an active exception", seen once on CPU/gloo) after the run finished.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
