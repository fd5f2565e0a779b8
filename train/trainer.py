"""The training loop: builds a stage's roles on a backend, runs steps, logs, checkpoints, resumes.

One step (default ``Stage.run_step``): ``grad_accum`` micro-batches of forward + backward (losses
scaled by 1/grad_accum, gradient sync on the last one only), then per updated role: lr from the
schedule, global grad norm, skip if it is non-finite or above the spike threshold (decided on the
device, identical on every rank), clip, optimizer step, EMA. Metrics stay on the device as running
sums; the only host syncs are at logging steps (plus one per step for optimizers that cannot skip
on the device, i.e. non-fused AdamW).

Run directory (created by the entry point, which also writes the resolved config there)::

    <out_dir>/ckpt/step_000123/ ...  checkpoints (see train.checkpoint), ckpt/latest
    <out_dir>/metrics.jsonl          one JSON record per logging step
    <out_dir>/wandb/                 offline wandb run (id in <out_dir>/wandb_run_id)
    <out_dir>/samples/step_000123/   whatever the stage's sample hook writes
    <out_dir>/export/                the stage's export at the end
    <out_dir>/status.json            completed | preempted | failed, with the step
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, write_text_atomic
from train.config import CheckpointConfig, DistConfig, LoggerConfig, OptimConfig, ScheduleConfig, TrainerConfig
from train.distributed import Backend, DistEnv, Wrapped, all_reduce_mean, any_rank, broadcast_object, init_distributed, make_backend, maybe_autocast, shutdown
from train.ema import EMA
from train.logging import RunLogger
from train.optim import LRSchedule, init_optimizer_state
from train.rng import capture_rng_state, rank_seed, restore_rng_state, seed_everything
from train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler
from train.stage import Role, Stage, StageContext, StepOutput


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended."""

    status: str  # "completed" | "preempted" | "dry_run"
    step: int  # optimizer steps done
    checkpoint: Optional[Path] = None  # the last checkpoint written

    @property
    def exit_code(self) -> int:
        """Process exit code for the entry point: requeue-able preemption is distinct from success."""
        return PREEMPTED_EXIT_CODE if self.status == "preempted" else 0


@dataclass
class RoleRuntime:
    """A role during training: its wrapped module, optimizer config, schedule, EMA, skip counter."""

    role: Role
    wrapped: Wrapped
    optim: Optional[OptimConfig]
    schedule: Optional[LRSchedule]
    ema: Optional[EMA]
    skipped: torch.Tensor  # updates skipped so far (device scalar; restored on resume)


def _as_config(cfg: Any, cls: type) -> Any:
    """A ``cls`` instance from None (defaults), an instance, a dict or an OmegaConf node."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return cls(**cfg)  # unknown keys raise TypeError naming them
    raise TypeError(f"expected a {cls.__name__}, a dict or an OmegaConf config, got {type(cfg).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def write_status(out_dir: Path, status: str, step: int, checkpoint: Optional[Path] = None, **extra: Any) -> None:
    """``<out_dir>/status.json`` (atomic): completed | preempted | failed | dry_run, the step, the last checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "step": step, "time": time.time(), "checkpoint": str(checkpoint) if checkpoint else None, **extra}
    write_text_atomic(out_dir / "status.json", json.dumps(record))


class Trainer:
    """Runs a :class:`~train.stage.Stage`; see the module docstring.

    Building blocks for a stage's custom ``run_step``: :meth:`forward_backward`,
    :meth:`optimizer_step`, :meth:`autocast`, :attr:`env`, :attr:`device`, :attr:`roles`.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        stage: Stage,
        out_dir: str | Path,
        *,
        optim: Optional[OptimConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
        dist: Optional[DistConfig] = None,
        logger: Optional[LoggerConfig] = None,
        checkpoint: Optional[CheckpointConfig] = None,
        run_config: Optional[dict[str, Any]] = None,
        preemption: Optional[PreemptionHandler] = None,
    ):
        self.cfg = _as_config(cfg, TrainerConfig)
        self.stage, self.out_dir = stage, Path(out_dir)
        self.optim_cfg = _as_config(optim, OptimConfig)
        self.schedule_cfg = _as_config(schedule, ScheduleConfig)
        self.dist_cfg = _as_config(dist, DistConfig)
        self.logger_cfg = _as_config(logger, LoggerConfig)
        self.ckpt_cfg = _as_config(checkpoint, CheckpointConfig)
        self.run_config = run_config
        self.preemption = preemption or PreemptionHandler()
        self.ckpt_dir = self.out_dir / "ckpt"
        self.env = DistEnv()
        self.device = torch.device("cpu")
        self.bf16 = False
        self.backend: Optional[Backend] = None
        self.roles: dict[str, RoleRuntime] = {}
        self.step = 0
        self.data_iter: Optional[Iterator[Any]] = None
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._tokens = 0
        self._lrs: dict[str, float] = {}
        self._last_ckpt: Optional[Path] = None

    # ------------------------------------------------------------------------------------------
    # Building
    # ------------------------------------------------------------------------------------------
    def _resolve_precision(self) -> bool:
        p = self.cfg.precision
        if p == "auto":
            return self.device.type == "cuda"
        return p == "bf16"

    def setup(self) -> None:
        """Process group, roles on the backend, optimizers, schedules, EMA, data, resume."""
        for cfg in (self.cfg, self.optim_cfg, self.schedule_cfg, self.dist_cfg, self.logger_cfg, self.ckpt_cfg):
            cfg.__post_init__()  # re-validate: fields may have been changed after construction
        self.env = init_distributed(self.dist_cfg)
        self.device = self.env.device
        self.bf16 = self._resolve_precision()
        self.backend = make_backend(self.dist_cfg, self.env, self.bf16)

        seed_everything(self.cfg.seed)  # identical on all ranks: FSDP2 shards weights each rank built
        ctx = StageContext(self.device, self.env.rank, self.env.world_size, self.cfg.seed, self.out_dir, torch.bfloat16 if self.bf16 else torch.float32)
        roles = self.stage.build(ctx)
        if not isinstance(roles, dict) or not roles or not all(isinstance(r, Role) for r in roles.values()):
            raise TypeError(f"stage '{self.stage.name}': build() must return a non-empty dict[str, Role], got {type(roles).__name__}")
        for name, role in roles.items():
            self.roles[name] = self._prepare_role(name, role)
        self.stage.models = {n: r.wrapped.module for n, r in self.roles.items()}
        self.stage.trainable_roles = [n for n, r in self.roles.items() if r.role.trainable]
        self.stage.device = self.device

        seed_everything(rank_seed(self.cfg.seed, self.env.rank))  # per-rank streams from here on
        self.data_iter = self.stage.build_data(ctx)
        self._resume()

    def _prepare_role(self, name: str, role: Role) -> RoleRuntime:
        assert self.backend is not None
        optim = (role.optim or self.optim_cfg) if role.trainable else None
        frozen_dtype = getattr(torch, role.frozen_dtype) if role.frozen_dtype else None
        if role.ema is not None and not role.trainable:
            raise ValueError(f"role '{name}': an EMA of a frozen role would never change; drop its ema config")
        if role.ema is not None and self.dist_cfg.backend == "deepspeed_zero3":
            raise ValueError(f"role '{name}': EMA is not supported with deepspeed_zero3 (parameters are partitioned away); use fsdp, whose EMA is sharded")
        w = self.backend.prepare(name, role.module, role.trainable, optim, role.wrap, frozen_dtype)
        schedule = None
        if role.trainable:
            if self.backend.checkpoint_format == "dcp":
                init_optimizer_state(w.optimizer)
            schedule = LRSchedule(w.optimizer, role.schedule or self.schedule_cfg, self.cfg.steps)
        ema = EMA([(n, p) for n, p in w.raw.named_parameters() if p.requires_grad], role.ema) if role.ema is not None else None
        return RoleRuntime(role, w, optim, schedule, ema, torch.zeros((), device=self.device))

    def _resume(self) -> None:
        assert self.backend is not None
        path = None
        if self.env.is_main:
            found = resolve_resume(self.ckpt_dir, self.ckpt_cfg.resume)
            path = str(found) if found is not None else None
        path = broadcast_object(path, self.env)
        if path is None:
            return
        wrapped = {n: r.wrapped for n, r in self.roles.items()}
        emas = {n: r.ema for n, r in self.roles.items() if r.ema is not None}
        trainer_state, rank_state = load_checkpoint(Path(path), env=self.env, fmt=self.backend.checkpoint_format, roles=wrapped, emas=emas)
        self.step = int(trainer_state["step"])
        for name, count in trainer_state.get("skipped", {}).items():
            if name in self.roles:
                self.roles[name].skipped.fill_(float(count))
        data_state = rank_state.get("data")
        if data_state is not None:
            if hasattr(self.data_iter, "load_state_dict"):
                self.data_iter.load_state_dict(data_state)  # type: ignore[union-attr]
            else:
                warnings.warn(f"{path}: has a data position but this stage's data iterator cannot load it; the data stream restarts")
        self.stage.load_state_dict(rank_state.get("stage") or {})
        if rank_state.get("rng") is not None:
            restore_rng_state(rank_state["rng"], where=f"{path} rank {self.env.rank}")
        else:
            seed_everything(rank_seed(self.cfg.seed + self.step, self.env.rank))
        self._last_ckpt = Path(path)

    # ------------------------------------------------------------------------------------------
    # Step building blocks (also for stages with custom run_step)
    # ------------------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast when the run is bf16 and the backend does not cast parameters itself."""
        assert self.backend is not None
        return maybe_autocast(self.device, self.bf16 and not self.backend.autocast_in_module)

    def forward_backward(self, batch: Any, step: int, roles: list[str], *, last: bool = True, scale: float = 1.0) -> StepOutput:
        """One micro-batch: move to device, ``compute_losses`` under autocast, backward ``scale * loss``.

        ``last`` marks the final micro-batch before :meth:`optimizer_step` (gradient sync happens there).
        """
        assert self.backend is not None
        unknown = [n for n in roles if n not in self.roles]
        if unknown:
            raise KeyError(f"stage '{self.stage.name}': step {step} updates unknown role(s) {unknown}; roles are {sorted(self.roles)}")
        batch = to_device(batch, self.device)
        wrapped = {n: self.roles[n].wrapped for n in roles}
        with self.backend.sync_context(list(wrapped.values()), last):
            with self.autocast():
                out = self.stage.compute_losses(batch, step)
            if not isinstance(out, StepOutput):
                raise TypeError(f"stage '{self.stage.name}': compute_losses must return a StepOutput, got {type(out).__name__}")
            missing = [n for n in roles if n not in out.losses]
            if missing:
                raise KeyError(f"stage '{self.stage.name}': compute_losses gave no loss for role(s) {missing} updated at step {step} (got {sorted(out.losses)})")
            if roles:
                self.backend.backward({n: out.losses[n] * scale for n in roles}, wrapped)
        return out

    def optimizer_step(self, roles: list[str], step: int) -> None:
        """Schedule, clip, skip-or-step and EMA for each role in ``roles``; clears the others' grads."""
        assert self.backend is not None
        for name in roles:
            r = self.roles[name]
            if not r.role.trainable or r.schedule is None or r.optim is None:
                raise ValueError(f"stage '{self.stage.name}': role '{name}' is frozen and cannot be updated")
            self._lrs[name] = r.schedule.apply(step) * r.schedule.base_lrs[0]
            norm, skipped = self.backend.optimizer_step(r.wrapped, r.optim)
            r.skipped += skipped
            self._add(f"grad_norm/{name}", norm)
            if r.ema is not None:
                r.ema.update(step, skipped)
        for name, r in self.roles.items():
            if name not in roles and r.role.trainable and r.wrapped.engine is None:
                r.wrapped.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------
    # Metrics (device-side running sums; one sync per logging step)
    # ------------------------------------------------------------------------------------------
    def _add(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1

    def record(self, out: StepOutput) -> None:
        """Accumulate a step's losses, metrics and tokens for the next log."""
        for k, v in out.losses.items():
            self._add(f"loss/{k}", v)
        for k, v in out.metrics.items():
            self._add(k, v)
        self._tokens += int(out.tokens)

    def _gather_metrics(self) -> dict[str, float]:
        keys = sorted(self._sums)
        if self.env.distributed and self.env.world_size > 1:
            ref = broadcast_object(keys, self.env)
            if ref != keys:
                raise RuntimeError(f"rank {self.env.rank} logged metrics {keys}, rank 0 logged {ref}: every rank must report the same keys")
        values = [torch.as_tensor(self._sums[k], dtype=torch.float32, device=self.device) / self._counts[k] for k in keys]
        values += [r.skipped.float() for r in self.roles.values()] + [torch.tensor(float(self._tokens), device=self.device)]
        reduced = all_reduce_mean(torch.stack(values), self.env).tolist()  # the host sync
        metrics = dict(zip(keys, reduced[: len(keys)]))
        for name, value in zip(self.roles, reduced[len(keys) : len(keys) + len(self.roles)]):
            if self.roles[name].role.trainable:
                metrics[f"skipped/{name}"] = value
        metrics.update({f"lr/{k}": v for k, v in self._lrs.items()})
        metrics["tokens"] = reduced[-1] * self.env.world_size
        self._sums, self._counts, self._tokens = {}, {}, 0
        return metrics

    # ------------------------------------------------------------------------------------------
    # Checkpoints, status
    # ------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current step (collective)."""
        assert self.backend is not None
        trainer_state = {
            "step": self.step,
            "skipped": {n: int(r.skipped.item()) for n, r in self.roles.items() if r.role.trainable},
            "world_size": self.env.world_size,
        }
        data_state = self.data_iter.state_dict() if hasattr(self.data_iter, "state_dict") else None  # type: ignore[union-attr]
        rank_state = {"rng": capture_rng_state(), "data": data_state, "stage": self.stage.state_dict()}
        self._last_ckpt = save_checkpoint(
            self.ckpt_dir,
            self.step,
            env=self.env,
            fmt=self.backend.checkpoint_format,
            backend=self.dist_cfg.backend,
            roles={n: r.wrapped for n, r in self.roles.items()},
            emas={n: r.ema for n, r in self.roles.items() if r.ema is not None},
            trainer_state=trainer_state,
            rank_state=rank_state,
            keep_last=self.ckpt_cfg.keep_last,
        )
        return self._last_ckpt

    def _write_status(self, status: str, **extra: Any) -> None:
        if self.env.is_main:
            write_status(self.out_dir, status, self.step, self._last_ckpt, **extra)

    def has_ema(self, name: str) -> bool:
        return self.roles[name].ema is not None

    def full_state_dict(self, name: str, ema: bool = False) -> dict[str, torch.Tensor]:
        """Role ``name``'s full weights on CPU (EMA values substituted if ``ema``).

        Collective (call on every rank); complete on rank 0, possibly empty on the others.
        """
        assert self.backend is not None
        r = self.roles[name]
        state = self.backend.full_state_dict(r.wrapped)
        if ema:
            if r.ema is None:
                raise ValueError(f"role '{name}' keeps no EMA")
            shadow = self.backend.full_tensors(r.ema.shadow)  # collective: every rank gathers
            if not state:  # FSDP2 gathers the weights to rank 0 only
                return state
            unknown = sorted(set(shadow) - set(state))
            if unknown:
                raise KeyError(f"role '{name}': EMA keys {unknown[:5]} are not in the module's state dict")
            state.update({k: v.to(state[k].dtype) for k, v in shadow.items()})
        return state

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train to ``cfg.steps`` (or until preempted); returns how it ended."""
        logger: Optional[RunLogger] = None
        try:
            with self.preemption:
                self.setup()
                if self.cfg.dry_run:
                    return self._dry_run()
                logger = RunLogger(self.logger_cfg, self.out_dir, is_main=self.env.is_main, total_steps=self.cfg.steps, start_step=self.step, run_config=self.run_config)
                if self.step:
                    logger.info(f"resumed from {self._last_ckpt} at step {self.step}")
                elif self.ckpt_cfg.resume:
                    logger.info(f"checkpoint.resume={self.ckpt_cfg.resume}: no checkpoint in {self.ckpt_dir} yet, starting at step 0")
                result = self._loop(logger)
            self._write_status(result.status, signal=self.preemption.signal_name)
            return result
        except BaseException as e:
            self._write_status("failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if logger is not None:
                logger.close()
            shutdown(self.env)

    def _loop(self, logger: RunLogger) -> FitResult:
        cfg, ck = self.cfg, self.ckpt_cfg
        while self.step < cfg.steps:
            step = self.step + 1
            out = self.stage.run_step(self, self.data_iter, step)
            if not isinstance(out, StepOutput):
                raise TypeError(f"stage '{self.stage.name}': run_step must return a StepOutput, got {type(out).__name__}")
            self.step = step
            self.record(out)
            logger.step_done()
            if step % self.logger_cfg.log_every == 0 or step == cfg.steps:
                logger.log(step, self._gather_metrics())
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample_metrics = self.stage.sample(self, step, self.out_dir / "samples" / f"step_{step:06d}")
                if sample_metrics:
                    logger.log(step, {f"sample/{k}": float(v) for k, v in sample_metrics.items()}, perf=False)
            stop = step % ck.preempt_check_every == 0 and any_rank(self.preemption.requested, self.env)
            periodic = ck.every > 0 and step % ck.every == 0
            final = step == cfg.steps and ck.save_final
            if stop or periodic or final:
                if self._sums and (stop or final):
                    logger.log(step, self._gather_metrics())
                path = self.save()
                logger.info(f"checkpoint {path}")
            if stop:
                logger.info(f"preempted ({self.preemption.signal_name}) at step {step}: checkpoint saved, exiting with code {PREEMPTED_EXIT_CODE}")
                return FitResult("preempted", step, self._last_ckpt)
        if cfg.export:
            self.stage.export(self, self.out_dir / "export")
        return FitResult("completed", self.step, self._last_ckpt)

    def _dry_run(self) -> FitResult:
        """One micro-batch forward/backward through every updated role; no step, nothing written."""
        step = self.step + 1
        roles = self.stage.roles_to_update(step)
        if self.data_iter is not None:
            self.forward_backward(next(self.data_iter), step, roles, last=True)
        for r in self.roles.values():
            if r.role.trainable and r.wrapped.engine is None:
                r.wrapped.optimizer.zero_grad(set_to_none=True)
        return FitResult("dry_run", self.step, None)
