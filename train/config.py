"""Typed configuration schemas of the trainer core (Hydra structured configs).

Plain types only, every field defaulted, so that OmegaConf can type-check overrides and a misspelt
key fails. Value checks run in ``__post_init__`` (``OmegaConf.to_object`` calls it) and again in
the trainer, and name the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("constant", "cosine", "linear")
BACKENDS = ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")


def _check(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {problem}")


@dataclass
class OptimConfig:
    """One optimizer (one per trainable role). ``muon`` = Muon on hidden matrices + AdamW on the rest."""

    name: str = "adamw"  # "adamw" | "muon"
    lr: float = 1e-4  # peak learning rate (Muon and its AdamW companion share it; Muon rescales by shape)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW and Muon)
    decay_1d: bool = False  # also decay 1-D params (biases, norm scales); off by convention
    muon_momentum: float = 0.95  # Muon Nesterov momentum
    muon_nesterov: bool = True  # Nesterov look-ahead on the Muon momentum
    ns_steps: int = 5  # Newton-Schulz iterations of the Muon orthogonalisation
    muon_exclude: list[str] = field(default_factory=lambda: ["embed", "final", "head"])  # name substrings kept on AdamW
    fused: bool = True  # fused AdamW kernel (also lets a skipped step stay on device, no host sync)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    spike_threshold: float = 0.0  # skip the update if the grad norm exceeds this; 0 disables (non-finite is always skipped)

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, "optim.name", f"'{self.name}' is not one of {list(OPTIMIZERS)}")
        _check(self.lr >= 0, "optim.lr", f"must be >= 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", f"need two values in [0, 1), got {list(self.betas)}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _check(self.ns_steps >= 1, "optim.ns_steps", f"must be >= 1, got {self.ns_steps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.spike_threshold >= 0, "optim.spike_threshold", f"must be >= 0, got {self.spike_threshold}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant / cosine / linear decay to ``min_lr_ratio``."""

    warmup_steps: int = 0  # steps of linear warm-up from 0 to the peak lr
    kind: str = "constant"  # "constant" | "cosine" | "linear"
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak (cosine / linear)
    decay_steps: Optional[int] = None  # step at which decay ends; None = trainer.steps

    def __post_init__(self) -> None:
        _check(self.kind in SCHEDULES, "schedule.kind", f"'{self.kind}' is not one of {list(SCHEDULES)}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.decay_steps is None or self.decay_steps > 0, "schedule.decay_steps", f"must be > 0, got {self.decay_steps}")


@dataclass
class EMAConfig:
    """Exponential moving average of a role's weights (the stage attaches one to a role)."""

    decay: float = 0.9999  # shadow <- decay * shadow + (1 - decay) * weights
    start_step: int = 0  # before this step the shadow copies the weights
    every: int = 1  # update every k optimizer steps

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, "ema.decay", f"must be in [0, 1), got {self.decay}")
        _check(self.start_step >= 0, "ema.start_step", f"must be >= 0, got {self.start_step}")
        _check(self.every >= 1, "ema.every", f"must be >= 1, got {self.every}")


@dataclass
class DistConfig:
    """Distributed backend and its memory/precision knobs."""

    backend: str = "none"  # "none" | "ddp" | "fsdp" | "deepspeed_zero2" | "deepspeed_zero3"
    pg_backend: str = "auto"  # torch.distributed backend: "auto" (nccl on GPU, gloo on CPU) | "nccl" | "gloo"
    timeout_minutes: int = 30  # collective timeout
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3) vs keep (ZeRO-2)
    activation_checkpointing: bool = False  # recompute each block of a ``blocks`` ModuleList in backward
    mixed_precision: bool = True  # with bf16: FSDP2 bf16 params/fp32 reduce, DeepSpeed bf16; else torch.autocast
    ddp_find_unused_parameters: bool = False  # DDP: allow parameters that get no gradient in a step
    deepspeed_offload_optimizer: bool = False  # DeepSpeed: keep optimizer states on CPU
    deepspeed_config: dict[str, Any] = field(default_factory=dict)  # extra keys merged over the generated DeepSpeed config

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "dist.backend", f"'{self.backend}' is not one of {list(BACKENDS)}")
        _check(self.pg_backend in ("auto", "nccl", "gloo"), "dist.pg_backend", f"'{self.pg_backend}' is not auto/nccl/gloo")
        _check(self.timeout_minutes > 0, "dist.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")


@dataclass
class LoggerConfig:
    """Progress bar, ``metrics.jsonl`` and Weights & Biases."""

    log_every: int = 10  # steps between metric logs (the only host syncs of the loop)
    progress_bar: bool = True  # tqdm bar on a TTY; plain log lines otherwise
    jsonl: bool = True  # append metrics to <run>/metrics.jsonl
    wandb: bool = True  # log to Weights & Biases (imported lazily)
    wandb_project: str = "worldsmith"  # wandb project
    wandb_entity: Optional[str] = None  # wandb entity (team); None = default
    wandb_name: Optional[str] = None  # run display name; None = run directory name
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "logger.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.wandb_mode in WANDB_MODES, "logger.wandb_mode", f"'{self.wandb_mode}' is not one of {list(WANDB_MODES)}")


@dataclass
class CheckpointConfig:
    """Checkpoint cadence, retention and resume."""

    every: int = 1000  # save every N steps (0 = only final / preemption)
    keep_last: int = 3  # keep the newest N complete checkpoints (0 = keep all)
    # "latest": the run directory's latest checkpoint (a fresh start when it has none; `python -m train`
    # first finds the run directory, train/runs.py) | a run directory | a checkpoint directory | None
    resume: Optional[str] = None
    save_final: bool = True  # save when the run completes
    preempt_check_every: int = 1  # steps between the cross-rank preemption checks

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _check(self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")
        _check(self.preempt_check_every >= 1, "checkpoint.preempt_check_every", f"must be >= 1, got {self.preempt_check_every}")


@dataclass
class TrainerConfig:
    """The loop itself."""

    steps: int = 1000  # optimizer steps of the run (total, across resumes)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # global seed (model init is identical on all ranks; per-rank streams are derived)
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    sample_every: int = 0  # steps between the stage's sampling/evaluation hook (0 = off)
    export: bool = True  # call the stage's export when the run completes
    dry_run: bool = False  # build everything and run one micro-batch forward/backward, then stop

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "trainer.steps", f"must be >= 1, got {self.steps}")
        _check(self.grad_accum >= 1, "trainer.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.precision in PRECISIONS, "trainer.precision", f"'{self.precision}' is not one of {list(PRECISIONS)}")
        _check(self.sample_every >= 0, "trainer.sample_every", f"must be >= 0, got {self.sample_every}")
