"""Process-group setup and the distributed backends (none, DDP, FSDP2, DeepSpeed ZeRO-2/3).

Launch: under ``torchrun`` the usual ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*`` variables are read;
under ``srun`` without torchrun, :func:`slurm_env` derives them from SLURM's. A distributed backend
started as one plain process forms a 1-process group (so ``fsdp`` also runs single-process).
gloo on CPU, nccl on GPU; flags (preemption) travel over a gloo group so they never wait on the GPU.

A backend turns a stage's :class:`~train.stage.Role` into a :class:`Wrapped` role (the module to
call, the raw module, the optimizer) and implements backward, the clipped/skipped optimizer step and
the full (gathered) state dict. Every rank takes the same skip decision because the grad norm it
tests is the global one (all-reduced by DDP, gathered by FSDP2, computed by DeepSpeed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from train.config import DistConfig, OptimConfig
from train.ema import clean_fqn
from train.optim import adamw_param_groups, build_optimizer, supports_device_skip

# --------------------------------------------------------------------------------------------
# Environment and process group
# --------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # a process group is in use
    owns_group: bool = False  # we created it (and destroy it at shutdown)
    control_group: Any = None  # gloo group for host-side flags

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist: ``scontrol show hostnames`` if present, else a parser."""
    if shutil.which("scontrol"):  # it fails where no slurm.conf is reachable: then the parser below
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        out = done.stdout.split() if done.returncode == 0 else []
        if out:
            return out[0]
    first = re.split(r",(?![^\[]*\])", nodelist)[0]  # split on commas outside brackets
    m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_env(environ: Optional[Mapping[str, str]] = None) -> Optional[dict[str, str]]:
    """torchrun-style variables from SLURM's (``srun`` without torchrun), or None outside SLURM tasks.

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the
    first host of the step's nodelist (``scontrol show hostnames`` when available), MASTER_PORT =
    the existing one or 20000 + job id mod 20000 (the same on every task, distinct across jobs).
    """
    e = os.environ if environ is None else environ
    if "SLURM_PROCID" not in e or "SLURM_NTASKS" not in e:
        return None
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": e["SLURM_PROCID"],
        "WORLD_SIZE": e["SLURM_NTASKS"],
        "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": e.get("MASTER_ADDR") or _first_host(nodelist),
        "MASTER_PORT": e.get("MASTER_PORT") or str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000),
    }


def launch_env(environ: Optional[Mapping[str, str]] = None) -> Optional[dict[str, str]]:
    """The launcher's variables: torchrun's if set, else SLURM's, else None (a plain process)."""
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return {k: e.get(k, d) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"))}
    return slurm_env(e)


def free_port() -> int:
    """A free TCP port on localhost (for single-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: DistConfig) -> DistEnv:
    """Set the device and, for distributed backends, join (or form) the process group."""
    launch = launch_env()
    world = int(launch["WORLD_SIZE"]) if launch else 1
    local_rank = int(launch["LOCAL_RANK"]) if launch else 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if cfg.backend == "none":
        if world > 1:
            raise ValueError(f"dist.backend=none but the launcher started {world} processes (WORLD_SIZE); choose ddp, fsdp or deepspeed_zero2/3")
        return DistEnv(device=device)
    store = None
    if launch is None:
        # One process without a launcher: a file store needs no TCP port (a free port picked and then bound
        # can be taken by another process in between).
        import tempfile

        launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        store = dist.FileStore(tempfile.mkstemp(prefix="worldsmith-pg-")[1], 1)
    else:
        os.environ.setdefault("MASTER_ADDR", launch["MASTER_ADDR"])
        os.environ.setdefault("MASTER_PORT", launch["MASTER_PORT"])
    rank = int(launch["RANK"])
    pg_backend = cfg.pg_backend if cfg.pg_backend != "auto" else ("nccl" if cuda else "gloo")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(pg_backend, rank=rank, world_size=world, store=store,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, distributed=True, owns_group=owns, control_group=control)


def shutdown(env: DistEnv) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if env.distributed and env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control_group)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if ``flag`` is True on any (host-side, over gloo: no GPU sync)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item())


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of ``t`` over ranks (on the device's process group)."""
    if env.distributed and env.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.control_group)
    return box[0]


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@dataclass
class Wrapped:
    """A role after the backend prepared it."""

    name: str
    module: nn.Module  # what the stage calls (DDP wrapper / FSDP2 module / DeepSpeed engine)
    raw: nn.Module  # the underlying module: state dicts, parameters, export
    optimizer: Any = None  # torch optimizer, or DeepSpeed's ZeRO optimizer
    trainable: bool = False
    engine: Any = None  # DeepSpeed engine


def _blocks(module: nn.Module) -> list[nn.ModuleList]:
    """Every ``blocks`` ModuleList in ``module`` (the unit of sharding and checkpointing)."""
    return [m.blocks for m in module.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Recompute each block of every ``blocks`` ModuleList in backward; returns how many were wrapped.

    The wrapper's state-dict hooks keep parameter keys unchanged, so checkpoints stay portable.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    n = 0
    for blocks in _blocks(module):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            n += 1
    return n


def _total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class Backend:
    """Base: single process. Subclasses override ``wrap`` and, where needed, the step pieces."""

    name = "none"
    checkpoint_format = "dcp"  # torch.distributed.checkpoint (portable across none/ddp/fsdp)
    autocast_in_module = False  # True when the backend casts params itself (FSDP2 / DeepSpeed bf16)

    def __init__(self, cfg: DistConfig, env: DistEnv, bf16: bool):
        self.cfg, self.env, self.bf16 = cfg, env, bf16

    # --- preparing roles ---------------------------------------------------------------------
    def prepare(self, name: str, module: nn.Module, trainable: bool, optim: Optional[OptimConfig], wrap: bool, frozen_dtype: Optional[torch.dtype]) -> Wrapped:
        if trainable and optim is None:
            raise ValueError(f"role '{name}': trainable but no optimizer config")
        if trainable and not wrap and self.env.world_size > 1:
            raise ValueError(f"role '{name}': a trainable role must be wrapped under dist.backend={self.name} (its gradients would not be synchronised)")
        if trainable and self.cfg.activation_checkpointing:
            apply_activation_checkpointing(module)
        if not trainable:
            module.requires_grad_(False)
            if frozen_dtype is not None:
                module.to(frozen_dtype)
        return self.wrap(name, module, trainable, optim, wrap)

    def wrap(self, name: str, module: nn.Module, trainable: bool, optim: Optional[OptimConfig], wrap: bool) -> Wrapped:
        module.to(self.env.device)
        opt = build_optimizer(module, optim) if trainable else None  # type: ignore[arg-type]
        return Wrapped(name, module, module, opt, trainable)

    # --- the step ----------------------------------------------------------------------------
    def sync_context(self, roles: list[Wrapped], last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward: gradient sync only on the last one."""
        return contextlib.nullcontext()

    def backward(self, losses: dict[str, torch.Tensor], roles: dict[str, Wrapped]) -> None:
        """Backpropagate each role's loss (one backward over the sum: they share one graph)."""
        total = sum(losses.values())
        total.backward()  # type: ignore[union-attr]

    def optimizer_step(self, w: Wrapped, optim: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, decide to skip (non-finite or spike), step, zero grads. Returns (grad norm, skipped 0/1).

        No host sync when the optimizer skips on device (fused AdamW, Muon); otherwise one.
        """
        params = [p for p in w.raw.parameters() if p.requires_grad]
        norm = _total_grad_norm(params)
        skip = ~torch.isfinite(norm)
        if optim.spike_threshold > 0:
            skip = skip | (norm > optim.spike_threshold)
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, optim.grad_clip, norm, foreach=True)
        opt = w.optimizer
        if supports_device_skip(opt):
            opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        elif not bool(skip):  # host sync: this optimizer cannot skip on device
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm.detach(), skip.to(torch.float32)

    # --- gathering -----------------------------------------------------------------------------
    def full_state_dict(self, w: Wrapped) -> dict[str, torch.Tensor]:
        """The role's full weights on CPU (meaningful on rank 0; called on all ranks)."""
        return {k: v.detach().cpu() for k, v in w.raw.state_dict().items()}

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gather sharded tensors (EMA shadows) to full CPU tensors."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


class DDPBackend(Backend):
    """DistributedDataParallel for trainable roles; frozen roles are replicated."""

    name = "ddp"

    def wrap(self, name: str, module: nn.Module, trainable: bool, optim: Optional[OptimConfig], wrap: bool) -> Wrapped:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module.to(self.env.device)
        if not (trainable and wrap):
            return Wrapped(name, module, module, None, trainable)
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        ddp = DDP(module, device_ids=ids, find_unused_parameters=self.cfg.ddp_find_unused_parameters)
        return Wrapped(name, ddp, module, build_optimizer(module, optim), trainable)  # type: ignore[arg-type]

    def sync_context(self, roles: list[Wrapped], last: bool) -> contextlib.AbstractContextManager:
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for w in roles:
            if hasattr(w.module, "no_sync"):
                stack.enter_context(w.module.no_sync())  # type: ignore[operator]
        return stack


class FSDPBackend(Backend):
    """FSDP2: ``fully_shard`` each block of every ``blocks`` ModuleList, then the root.

    With bf16 mixed precision, params are gathered in bf16 and gradients reduced in fp32 (the fp32
    sharded params are the master weights). Gradients are reduce-scattered every micro-batch (no
    no-sync accumulation: it would hold full unsharded gradients). Frozen roles are sharded too.
    """

    name = "fsdp"
    autocast_in_module = True

    def __init__(self, cfg: DistConfig, env: DistEnv, bf16: bool):
        super().__init__(cfg, env, bf16)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(env.device.type, (env.world_size,))
        self.autocast_in_module = bf16 and cfg.mixed_precision

    def wrap(self, name: str, module: nn.Module, trainable: bool, optim: Optional[OptimConfig], wrap: bool) -> Wrapped:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not wrap:
            module.to(self.env.device)
            return Wrapped(name, module, module, None, trainable)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.autocast_in_module else MixedPrecisionPolicy()
        reshard = self.cfg.fsdp_reshard_after_forward
        for blocks in _blocks(module):
            for block in blocks:
                fully_shard(block, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(module, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard)
        opt = build_optimizer(module, optim) if trainable else None  # type: ignore[arg-type]
        return Wrapped(name, module, module, opt, trainable)

    def full_state_dict(self, w: Wrapped) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(w.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-2 / ZeRO-3 engines, one per trainable role, from a generated config.

    The engine runs in caller-owned accumulation mode (``managed_gradient_accumulation: false``):
    each ``backward`` accumulates, ``step`` reduces and updates, so custom loops may accumulate any
    number of micro-batches. AdamW only (torch's, via ``torch_adam``: no JIT-compiled kernels).
    DeepSpeed clips and skips non-finite updates itself (counted); a spike threshold is not
    available because the norm is only known inside its step.
    """

    checkpoint_format = "deepspeed"

    def __init__(self, cfg: DistConfig, env: DistEnv, bf16: bool, zero_stage: int):
        super().__init__(cfg, env, bf16)
        self.zero_stage = zero_stage
        self.name = f"deepspeed_zero{zero_stage}"
        self.autocast_in_module = False  # our autocast still wraps the forward (inputs stay fp32)
        if env.device.type == "cpu":
            _disable_deepspeed_shm()
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

    def config(self, optim: OptimConfig) -> dict[str, Any]:
        """The DeepSpeed config of one role's engine."""
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # batches are fed by the trainer; DeepSpeed only needs a value
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": optim.grad_clip,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay, "torch_adam": True, "adam_w_mode": True},
            },
            "zero_optimization": {"stage": self.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
            "bf16": {"enabled": bool(self.bf16 and self.cfg.mixed_precision)},
        }
        if self.zero_stage == 3:
            cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        if self.cfg.deepspeed_offload_optimizer:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": self.env.device.type == "cuda"}
        return _deep_merge(cfg, self.cfg.deepspeed_config)

    def wrap(self, name: str, module: nn.Module, trainable: bool, optim: Optional[OptimConfig], wrap: bool) -> Wrapped:
        import deepspeed

        module.to(self.env.device)
        if not trainable:
            return Wrapped(name, module, module, None, False)
        assert optim is not None
        if optim.name != "adamw":
            raise ValueError(
                f"role '{name}': optim.name={optim.name} is not supported with dist.backend={self.name}: ZeRO updates flat "
                "gradient partitions (no whole matrices to orthogonalise) and DeepSpeed's own Muon scales steps differently; use fsdp or ddp"
            )
        if optim.spike_threshold > 0:
            raise ValueError(
                f"role '{name}': optim.spike_threshold is not supported with dist.backend={self.name} (the grad norm is only known "
                "inside DeepSpeed's step; non-finite updates are still skipped); set it to 0 or use fsdp/ddp"
            )
        engine, ds_opt, _, _ = deepspeed.initialize(model=module, model_parameters=adamw_param_groups(module, optim), config=self.config(optim), dist_init_required=False)
        return Wrapped(name, engine, engine.module, ds_opt, True, engine=engine)

    def backward(self, losses: dict[str, torch.Tensor], roles: dict[str, Wrapped]) -> None:
        names = list(losses)
        for i, name in enumerate(names):
            roles[name].engine.backward(losses[name], retain_graph=i < len(names) - 1, scale_wrt_gas=False)

    def optimizer_step(self, w: Wrapped, optim: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
        engine = w.engine
        skipped_before = engine.skipped_steps
        engine.step()
        skipped = float(engine.skipped_steps - skipped_before)
        norm = engine.get_global_grad_norm()
        norm_t = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).to(self.env.device).reshape(())
        return norm_t, torch.tensor(skipped, device=self.env.device)

    def full_state_dict(self, w: Wrapped) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            import deepspeed

            params = list(w.raw.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {clean_fqn(k): v.detach().float().cpu().clone() for k, v in w.raw.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in w.raw.state_dict().items()}


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _disable_deepspeed_shm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory collectives (gloo does the work)."""
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
    compatible["deepspeed_shm_comm"] = False


def make_backend(cfg: DistConfig, env: DistEnv, bf16: bool) -> Backend:
    """The backend named by ``cfg.backend``."""
    if cfg.backend == "none":
        return Backend(cfg, env, bf16)
    if cfg.backend == "ddp":
        return DDPBackend(cfg, env, bf16)
    if cfg.backend == "fsdp":
        return FSDPBackend(cfg, env, bf16)
    if cfg.backend in ("deepspeed_zero2", "deepspeed_zero3"):
        return DeepSpeedBackend(cfg, env, bf16, zero_stage=int(cfg.backend[-1]))
    raise ValueError(f"dist.backend: unknown backend '{cfg.backend}'")


@contextlib.contextmanager
def maybe_autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``enabled``."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled):
        yield
