"""The rollout policy shadow: an EMA copy of the policy that samples every rollout and supplies v_old.

WorldCompass samples with an EMA "policy shadow" whose decay ramps up, decay_k = min(0.9, 0.2 + 0.01·k),
and keeps a separate, fixed-decay EMA for checkpoints (the trainer's role EMA). The shadow is its own
module (the policy's architecture, LoRA adapters included), so the NFT update can evaluate the current
policy and the sampling policy side by side without swapping weights. It is updated once per RL step,
after all of that step's optimizer updates, so v_old is exactly the policy that sampled the candidates.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["PolicyShadow"]


class PolicyShadow:
    """EMA copy of a policy module: ``shadow <- d_k * shadow + (1 - d_k) * policy`` on the trainable parameters."""

    def __init__(self, policy: nn.Module, decay: Callable[[int], float], device: torch.device | str = "cpu"):
        self.module = copy.deepcopy(policy).to(device).eval().requires_grad_(False)
        self.decay = decay
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("PolicyShadow: the policy has no trainable parameters")
        self._own = dict(self.module.named_parameters())
        self.updates = 0

    @torch.no_grad()
    def update(self, policy: nn.Module, k: int) -> float:
        """Fold the policy's current weights in after RL step ``k``; returns the decay used."""
        d = float(self.decay(k))
        params = dict(policy.named_parameters())
        for n in self.names:
            q = self._own[n]
            q.lerp_(params[n].detach().to(device=q.device, dtype=q.dtype), 1.0 - d)
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"params": {n: self._own[n].detach().clone() for n in self.names}, "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        missing, extra = sorted(set(self.names) - set(params)), sorted(set(params) - set(self.names))
        if missing or extra:
            raise KeyError(f"PolicyShadow: checkpoint parameters differ from the policy's: missing {missing[:5]}, unexpected {extra[:5]}")
        for n in self.names:
            self._own[n].copy_(params[n])
        self.updates = int(state.get("updates", 0))
