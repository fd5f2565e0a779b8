"""The stage protocol: what a training stage (pretrain, mid-train, LoRA, RL, distillation) provides.

A stage builds its **roles** (student, EMA'd student, teacher, critic, reward models, ...), says how
to turn one micro-batch into one loss per trainable role, and which roles to update at a step. The
trainer owns everything else: distributed wrapping, precision, accumulation, clipping, skipping,
EMA, schedules, logging, checkpoints, preemption.

Minimal stage::

    @register_stage("regression")
    class Regression(Stage):
        def build(self, ctx):
            return {"student": Role(MLP(), ema=EMAConfig(decay=0.999))}
        def build_data(self, ctx):
            return ResumableLoader(MyDataset(), batch_size=8, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
        def compute_losses(self, batch, step):
            pred = self.models["student"](batch["x"])
            loss = (pred - batch["y"]).pow(2).mean()
            return StepOutput(losses={"student": loss}, metrics={"mse": loss.detach()})

Contract for ``compute_losses``: each role's loss must reach only that role's parameters (detach
cross-role paths, as DMD does with its critic output). Roles not updated at this step must run under
``torch.no_grad()`` (DDP requires every forward with grad enabled to be followed by a backward).
Several optimizers on different cadences: override ``roles_to_update`` (e.g. a DMD critic every step,
the generator every 5th). Custom outer loops (RL: rollout, then several updates): override
``run_step`` and compose ``trainer.forward_backward`` / ``trainer.optimizer_step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from train.config import EMAConfig, OptimConfig, ScheduleConfig

if TYPE_CHECKING:
    from train.trainer import Trainer


@dataclass
class Role:
    """One model a stage uses. Frozen roles (teacher, reward) get no optimizer and are not saved."""

    module: nn.Module  # the model, built on CPU (the trainer moves/shards it)
    trainable: bool = True  # gets an optimizer, gradients, checkpoints
    optim: Optional[OptimConfig] = None  # None: the run's ``optim`` config
    schedule: Optional[ScheduleConfig] = None  # None: the run's ``schedule`` config
    ema: Optional[EMAConfig] = None  # keep an EMA of this role's weights
    wrap: bool = True  # let the backend wrap it (DDP/FSDP2/DeepSpeed); frozen roles are FSDP-sharded when True
    frozen_dtype: Optional[str] = None  # cast a frozen role to this dtype ("bfloat16"); None keeps its dtype


@dataclass
class StageContext:
    """What ``build`` and ``build_data`` may use: where they run and the run's seed."""

    device: torch.device
    rank: int
    world_size: int
    seed: int
    out_dir: Path
    compute_dtype: torch.dtype  # bf16 under mixed precision, fp32 otherwise


@dataclass
class StepOutput:
    """What one micro-batch (or one whole step) produced.

    ``losses``: role name -> scalar loss to backpropagate into that role. ``metrics``: scalars to
    log (tensors stay on the device until a logging step). ``tokens``: tokens processed, for
    tokens/s (a host int, e.g. from shapes).
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    tokens: int = 0

    @staticmethod
    def mean(outputs: list["StepOutput"]) -> "StepOutput":
        """Average losses and metrics over micro-batches (detached); sum tokens."""
        if not outputs:
            raise ValueError("StepOutput.mean: no micro-batch outputs")

        def avg(dicts: list[dict]) -> dict:
            out = {}
            for key in dict.fromkeys(k for d in dicts for k in d):
                values = [_detached(d[key]) for d in dicts if key in d]
                out[key] = values[0] if len(values) == 1 else sum(values) / len(values)
            return out

        return StepOutput(avg([o.losses for o in outputs]), avg([o.metrics for o in outputs]), sum(o.tokens for o in outputs))


def _detached(v: torch.Tensor | float) -> torch.Tensor | float:
    return v.detach() if isinstance(v, torch.Tensor) else v


@runtime_checkable
class ResumableIterator(Protocol):
    """A data stream whose position is checkpointed: ``next`` gives a batch; state restores it.

    ``state_dict()`` is called on every rank at checkpoint time; on resume with the same world size
    each rank gets its own state back, with a different world size every rank gets rank 0's, so the
    state should describe the global position (see ``train.resumable.ResumableLoader``).
    """

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: str = ""

    def __init__(self, cfg: Any = None):
        self.cfg = cfg
        # Set by the trainer once the roles are wrapped:
        self.models: dict[str, nn.Module] = {}  # role -> module to call (DDP / FSDP2 / DeepSpeed engine)
        self.trainable_roles: list[str] = []  # names of the trainable roles
        self.device: torch.device = torch.device("cpu")

    # --- required -------------------------------------------------------------------------
    def build(self, ctx: StageContext) -> dict[str, Role]:
        """Build the roles (on CPU; identical on every rank: the trainer seeds all ranks alike)."""
        raise NotImplementedError(f"stage '{self.name}' must implement build(ctx)")

    def compute_losses(self, batch: Any, step: int) -> StepOutput:
        """One micro-batch (already on the device) -> one scalar loss per role to update, plus metrics."""
        raise NotImplementedError(f"stage '{self.name}' must implement compute_losses(batch, step)")

    # --- optional -------------------------------------------------------------------------
    def build_data(self, ctx: StageContext) -> Optional[ResumableIterator]:
        """This rank's infinite batch iterator (None for stages that generate their own data)."""
        return None

    def roles_to_update(self, step: int) -> list[str]:
        """Roles whose optimizer steps at ``step``; default: every trainable role."""
        return list(self.trainable_roles)

    def run_step(self, trainer: "Trainer", data_iter: Optional[Iterator[Any]], step: int) -> StepOutput:
        """One training step: ``grad_accum`` micro-batches, then clipped optimizer steps."""
        roles = self.roles_to_update(step)
        n = trainer.cfg.grad_accum
        outputs = []
        for i in range(n):
            if data_iter is None:
                raise RuntimeError(f"stage '{self.name}': build_data returned None, so run_step must be overridden")
            outputs.append(trainer.forward_backward(next(data_iter), step, roles, last=i == n - 1, scale=1.0 / n))
        trainer.optimizer_step(roles, step)
        return StepOutput.mean(outputs)

    def sample(self, trainer: "Trainer", step: int, out_dir: Path) -> dict[str, float]:
        """Periodic sampling/evaluation (every ``trainer.sample_every`` steps, on all ranks); returns metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Stage-specific state to checkpoint (this rank's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def export(self, trainer: "Trainer", out_dir: Path) -> None:
        """Write what inference needs (called on all ranks; gather with ``trainer.full_state_dict``).

        Default: ``<role>.safetensors`` per trainable role (its EMA where it keeps one), rank 0.
        Stages that produce bundles override this.
        """
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        for name in self.trainable_roles:
            state = trainer.full_state_dict(name, ema=trainer.has_ema(name))
            if trainer.env.is_main:
                save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / f"{name}.safetensors"))


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: make a :class:`Stage` buildable by ``name`` (``stage.name`` in configs)."""

    def decorate(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"register_stage('{name}'): {cls!r} is not a Stage subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_stage: '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def build_stage(name: str, cfg: Any = None) -> Stage:
    """Instantiate the stage registered as ``name`` with its config."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage '{name}'; registered: {sorted(_REGISTRY)} (is the module defining it imported?)")
    return _REGISTRY[name](cfg)


def registered_stages() -> list[str]:
    """Names of all registered stages."""
    return sorted(_REGISTRY)
