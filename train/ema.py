"""Exponential moving average of a role's weights.

The shadow is fp32 and lives next to the weights it tracks: plain tensors in a single process or
under DDP, DTensor shards under FSDP2 (so it is sharded, and checkpointed and resharded with DCP
like the weights). Keys are the parameters' clean FQNs, the same as the module's state dict.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from train.config import EMAConfig

_WRAPPER_TOKENS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper tokens (the state-dict key)."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Shadow weights updated after each applied optimizer step.

    Before ``start_step`` the shadow copies the weights; from then on, every ``every`` steps,
    ``shadow <- decay * shadow + (1 - decay) * weight``. A skipped update (``skipped`` = 1) leaves
    the shadow unchanged, decided on the device.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: EMAConfig):
        self.cfg = cfg
        self.params: dict[str, torch.Tensor] = {clean_fqn(n): p for n, p in named_params}
        if not self.params:
            raise ValueError("EMA: the role has no parameters to average")
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().clone().float() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int, skipped: Optional[torch.Tensor] = None) -> None:
        """Fold the current weights in after optimizer step ``step`` (1-based)."""
        if step < self.cfg.start_step:
            for name, p in self.params.items():
                _local(self.shadow[name]).copy_(_local(p))
            return
        if (step - self.cfg.start_step) % self.cfg.every:
            return
        weight: float | torch.Tensor = 1.0 - self.cfg.decay
        for name, p in self.params.items():
            s, w = _local(self.shadow[name]), _local(p)
            if skipped is not None:
                weight = (1.0 - self.cfg.decay) * (1.0 - skipped.to(device=s.device, dtype=s.dtype))
            s.lerp_(w.to(s.dtype), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow, keyed by clean FQN (DTensors under FSDP2)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "<ema>") -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise KeyError(f"{where}: EMA keys differ from the role's parameters: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            if value is not self.shadow[name]:
                if tuple(value.shape) != tuple(self.shadow[name].shape):
                    raise ValueError(f"{where}: EMA '{name}' has shape {list(value.shape)}, the parameter {list(self.shadow[name].shape)}")
                self.shadow[name].copy_(value)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Run the module with the shadow weights inside the block (sampling, evaluation)."""
        with torch.no_grad():
            backup = {n: _local(p).clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                _local(p).copy_(_local(self.shadow[n]))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _local(p).copy_(backup[n])
