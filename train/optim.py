"""Optimizers (AdamW, Muon) and learning-rate schedules.

Muon (as in the HY-WorldPlay trainer, research/worldplay.md §8.3, §9.4): for each hidden weight
matrix, Nesterov momentum (0.95), then the update is orthogonalised by 5 Newton-Schulz iterations
and rescaled by ``0.2 * sqrt(max(rows, cols))`` so that its RMS matches AdamW's and both share one
learning rate; weight decay is decoupled. 1-D parameters, embeddings and the final layer stay on
AdamW. :func:`split_muon_params` makes that grouping explicit.

Skipped steps stay on the device: optimizers that set ``_step_supports_amp_scaling`` read a 0-d
``found_inf`` tensor attribute (the protocol of ``torch.amp.GradScaler``) and leave parameters and
state untouched where it is 1, without a host synchronisation. Torch's fused AdamW does this, and so
does :class:`Muon`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from train.config import OptimConfig, ScheduleConfig

# Quintic Newton-Schulz coefficients that push singular values towards 1 fastest from a
# Frobenius-normalised start (Keller Jordan's Muon); the result is ~U S' V^T with S' in ~[0.7, 1.2].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_RMS_SCALE = 0.2


# --------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal polar factor U V^T of a matrix [R, C] (bf16 on GPU, fp32 on CPU)."""
    if g.ndim != 2:
        raise ValueError(f"newton_schulz: expected a matrix, got shape {list(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + eps)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def muon_scale(shape: Sequence[int]) -> float:
    """Shape-based step scale of a Muon update: 0.2 * sqrt(max(rows, cols)) of its matrix view."""
    rows, cols = shape[0], math.prod(shape[1:])
    return MUON_RMS_SCALE * math.sqrt(max(rows, cols))


def split_muon_params(module: nn.Module, exclude: Sequence[str] = ("embed", "final", "head")) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (Muon, AdamW) lists of (name, param).

    Muon takes parameters with >= 2 dims, except those owned by an ``nn.Embedding`` and those whose
    name contains any of ``exclude`` (the input embedders and the final layer). Everything else,
    including every 1-D parameter, goes to AdamW.
    """
    muon: list[tuple[str, nn.Parameter]] = []
    adamw: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            excluded = isinstance(mod, nn.Embedding) or any(pattern in name for pattern in exclude)
            (muon if p.ndim >= 2 and not excluded else adamw).append((name, p))
    return muon, adamw


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _orthogonalized(update: torch.Tensor, param: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz on the full matrix of ``update`` (a local shard if ``param`` is a DTensor)."""
    if isinstance(param, DTensor):
        sharded = DTensor.from_local(update, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False)
        full = sharded.full_tensor()
        ortho = newton_schulz(full.reshape(full.shape[0], -1), steps).reshape(full.shape)
        replicated = DTensor.from_local(ortho, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)
        return replicated.redistribute(param.device_mesh, param.placements).to_local()
    return newton_schulz(update.reshape(update.shape[0], -1), steps).reshape(update.shape)


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others, in one optimizer (one state dict).

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay. AdamW group keys: lr, betas,
    eps, weight_decay. Works on plain tensors (single process, DDP) and FSDP2 DTensors (each matrix
    is gathered for the orthogonalisation, then re-sharded).
    """

    _step_supports_amp_scaling = True  # honours a ``found_inf`` tensor: skip on device

    def __init__(self, param_groups: list[dict], lr: float = 1e-4):
        defaults = dict(lr=lr, use_muon=False, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"Muon: a Muon group holds a parameter of shape {list(p.shape)}; Muon needs >= 2-D weights")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                skip = None if found_inf is None else found_inf.to(p.device).bool()
                if group["use_muon"]:
                    self._muon_update(p, group, skip)
                else:
                    self._adamw_update(p, group, skip)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict, skip: Optional[torch.Tensor]) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        w, g, buf = _local(p), _local(p.grad), _local(state["momentum_buffer"])
        mu = group["momentum"]
        new_buf = buf * mu + g
        update = g + mu * new_buf if group["nesterov"] else new_buf
        ortho = _orthogonalized(update, p, group["ns_steps"])
        lr = group["lr"]
        new_w = w * (1 - lr * group["weight_decay"]) - (lr * muon_scale(p.shape)) * ortho
        _commit(buf, new_buf, skip)
        _commit(w, new_w, skip)

    def _adamw_update(self, p: torch.Tensor, group: dict, skip: Optional[torch.Tensor]) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        w, g = _local(p), _local(p.grad)
        m, v, t = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        new_t = t + 1
        new_m = torch.lerp(m, g, 1 - beta1)
        new_v = v * beta2 + (1 - beta2) * g * g
        bias1 = 1 - beta1**new_t
        bias2 = 1 - beta2**new_t
        denom = (new_v / bias2).sqrt() + group["eps"]
        new_w = w * (1 - lr * group["weight_decay"]) - lr * (new_m / bias1) / denom
        _commit(t, new_t, skip)
        _commit(m, new_m, skip)
        _commit(v, new_v, skip)
        _commit(w, new_w, skip)


def _commit(dst: torch.Tensor, new: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
    """dst <- new, or dst unchanged where ``skip`` (0-d bool tensor) is set; no host sync."""
    dst.copy_(new if skip is None else torch.where(skip, dst, new))


# --------------------------------------------------------------------------------------------
# Building optimizers
# --------------------------------------------------------------------------------------------


def _decay_split(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, no_decay = [], []
    for _, p in named:
        (decay if p.ndim >= 2 or cfg.decay_1d else no_decay).append(p)
    return decay, no_decay


def adamw_param_groups(module: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups of ``module``'s trainable params: weight decay on >=2-D (and 1-D if ``decay_1d``)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay, no_decay = _decay_split(named, cfg)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_param_groups(module: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon groups (``use_muon=True``) plus AdamW groups for the parameters Muon does not take."""
    muon, rest = split_muon_params(module, cfg.muon_exclude)
    decay, no_decay = _decay_split(rest, cfg)
    adam = dict(use_muon=False, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    groups = [
        dict(params=[p for _, p in muon], use_muon=True, lr=cfg.lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay),
        dict(params=decay, weight_decay=cfg.weight_decay, **adam),
        dict(params=no_decay, weight_decay=0.0, **adam),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of one role, over ``module``'s trainable parameters (after any sharding)."""
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"build_optimizer: {type(module).__name__} has no trainable parameters")
    if cfg.name == "muon":
        return Muon(muon_param_groups(module, cfg), lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(adamw_param_groups(module, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None)
    raise ValueError(f"optim.name: unknown optimizer '{cfg.name}'")


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step from a device-side ``found_inf`` flag (fused AdamW, Muon)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's optimizer state now (zeros, step 0) without changing any parameter.

    Checkpoints then always hold complete state. Otherwise DCP would initialise a still-empty state
    at save time with a zero-lr step, which advances AdamW's step count (changing its bias
    correction) and makes a resumed run differ from an uninterrupted one.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params or len(optimizer.state) == len(params):
        return
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        if supports_device_skip(optimizer):  # a skipped step builds the state and leaves it at zero
            optimizer.grad_scale, optimizer.found_inf = None, torch.ones((), device=_local(params[0]).device)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state[p]
                    if not state:  # the layout of torch's foreach/single-tensor Adam
                        state["step"] = torch.tensor(0.0, dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        if group.get("amsgrad"):
                            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            raise TypeError(f"init_optimizer_state: cannot initialise {type(optimizer).__name__} without a step; use fused AdamW or Muon")
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (1-based): warm-up, then the decay kind."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)))
    floor = cfg.min_lr_ratio
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.kind: unknown schedule '{cfg.kind}'")


class LRSchedule:
    """Sets each param group's lr to ``base_lr * lr_factor(step)``.

    Stateless: the lr is a function of the config and the step, so a resumed run (or one resumed
    with a changed lr) needs nothing from the checkpoint. Works on anything with ``param_groups``
    (torch optimizers, DeepSpeed's ZeRO wrappers). The base lrs are captured at construction,
    before a checkpoint's optimizer state overwrites the group lrs.
    """

    def __init__(self, optimizer, cfg: ScheduleConfig, total_steps: int):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def apply(self, step: int) -> float:
        """Set the lrs for ``step``; returns the factor (for logging)."""
        factor = lr_factor(step, self.cfg, self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor
