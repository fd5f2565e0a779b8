"""Stage ``midtrain``: memory training with reconstituted context (WorldPlay §5.4).

Each sample is either a *memory* sample (probability ``memory_prob``): a target chunk far enough
into the clip, its sequence built by ``models.layout.chunk_layout`` (the builder the rollout
sampler calls at inference, on the same ``sampling.memory`` config), packed as
[context (sorted) | target] with contiguous reframed positions, the loss on the target only; or a
*window* sample: the first latents of the clip, contiguous, per-chunk noise, loss on all. Both
have ``max_context + chunk`` latents, so they batch. Context latents are clean (sigma tag
``sampling.context_sigma``, as the sampler caches them) or lightly noised up to
``context_sigma_max``. With ``self_history_prob`` the most recent context latents of a batch's memory
samples are the model's own no-grad rollout through the inference sampler (exposure bias: at inference
the history is generated, errors included). A curriculum bounds how far into the clip targets may lie,
so retrieval distances grow over training.

``mode=bidirectional`` trains the Context-Forcing teacher: a window of ``sampling.window_latents``
with the union memory of its chunks (``models.layout.teacher_layout``), full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from models.layout import chunk_layout, teacher_layout, window_layout
from models.rollout import Rollout
from train.stage import register_stage
from train.stages.flow_stage import FlowStage, FlowStageConfig
from train.stages.inputs import ModelInputs, clip_inputs, layout_inputs
from train.stages.pretrain import window_sigmas


@dataclass
class MidtrainConfig(FlowStageConfig):
    """Mid-training knobs; the memory rule itself is ``sampling.memory`` (shared with inference)."""

    name: str = "midtrain"
    memory_prob: float = 0.8  # fraction of memory samples (the rest are plain windows)
    context_sigma_max: float = 0.0  # >0: noise each context chunk with sigma ~ U[context_sigma, max] (WorldPlay: 0.5)
    # Exposure bias: with this probability a batch's memory samples see their most recent context latents as
    # the model itself generates them (a no-grad rollout through the inference sampler from the true history
    # before them), so training sees the history the sampler will feed at inference, errors included.
    self_history_prob: float = 0.0
    self_history_latents: int = 0  # latents regenerated before the target (0: sampling.memory.temporal_latents)
    self_history_steps: int = 4  # Euler steps of those rollouts
    # [from_step, max_latents] pairs: targets may lie up to max_latents into the clip from from_step on.
    curriculum: list[list[int]] = field(default_factory=lambda: [[0, 32], [500, 64], [1000, 96], [2000, 128], [3000, 160]])


def curriculum_length(curriculum: list[list[int]], step: int, available: int) -> int:
    """Usable clip length (latents) at ``step``: the last curriculum entry whose from_step <= step."""
    length = available
    for from_step, max_latents in sorted(curriculum):
        if step >= from_step:
            length = max_latents
    return min(length, available)


@register_stage("midtrain")
class Midtrain(FlowStage):
    def build(self, ctx):
        roles = super().build(ctx)
        self.mem = self.rollout_config().memory
        if self.mem.chunk_size != self.scfg.chunk_size:
            raise ValueError(f"sampling.memory.chunk_size={self.mem.chunk_size} must equal stage.chunk_size={self.scfg.chunk_size}")
        self.seq_len = self.mem.max_context + self.scfg.chunk_size
        # Which sample kind and which target: host-side choices, drawn on the CPU so the step
        # never waits on the device to decide a layout.
        self.layout_rng = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.rank + 29)
        return roles

    def sequence_length(self) -> int | None:
        """Causal memory samples are max_context + chunk latents at positions 0..n-1; teacher layouts vary."""
        return self.seq_len if self.scfg.mode == "causal" else None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layout_rng": self.layout_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "layout_rng" in state:
            self.layout_rng.set_state(state["layout_rng"].cpu())

    def make_inputs(self, batch: dict[str, Any], x0: torch.Tensor, step: int) -> ModelInputs:
        if self.scfg.mode == "bidirectional":
            return self._teacher_inputs(batch, x0, step)
        B, _, T = x0.shape[:3]
        C, M = self.scfg.chunk_size, self.mem.max_context
        if T < self.seq_len:
            raise ValueError(f"data.num_latents={T} is shorter than a mid-train sample of {self.seq_len} latents (sampling.memory.max_context + chunk)")
        length = curriculum_length(self.scfg.curriculum, step, T)
        c2w = batch["c2w"]  # on the batch's device: memory selection there needs no host sync
        # Targets start at or after M so the context is always full (WorldPlay: cur >= 24).
        starts = list(range(-(-M // C) * C, length - C + 1, C))
        rng = self.layout_rng
        self_history = bool(starts) and float(torch.rand((), generator=rng)) < self.scfg.self_history_prob
        shared = starts[int(torch.randint(len(starts), (), generator=rng))] if self_history else None
        layouts, memory_rows = [], []
        for b in range(B):
            use_memory = bool(starts) and float(torch.rand((), generator=rng)) < self.scfg.memory_prob
            if use_memory:
                # one target for the batch's self-history samples: their rollouts run as one batch
                cur = shared if self_history else starts[int(torch.randint(len(starts), (), generator=rng))]
                layouts.append(chunk_layout(c2w[b : b + 1, :cur], c2w[b : b + 1, cur : cur + C], self.mem))
                memory_rows.append(b)
            else:
                layouts.append(window_layout(1, 0, self.seq_len, x0.device))
        if self_history and memory_rows:
            x0 = self._self_history(batch, x0, memory_rows, shared)
        clip = clip_inputs(batch, x0, C)
        sigma = window_sigmas(B, self.seq_len, self.scfg, self.generator, x0.device)
        return layout_inputs(clip, layouts, sigma, self._context_sigma(B, self.seq_len, x0.device))

    @torch.no_grad()
    def _self_history(self, batch: dict[str, Any], x0: torch.Tensor, rows: list[int], cur: int) -> torch.Tensor:
        """x0 with latents [cur - n, cur) of ``rows`` replaced by the model's own rollout from the true history
        before them (the inference sampler, ``self_history_steps`` Euler steps; the anchor chunk stays true)."""
        C = self.scfg.chunk_size
        n = self.scfg.self_history_latents or self.mem.temporal_latents
        start = max(C, cur - n // C * C)
        if start >= cur:
            return x0
        model = self.models["student"]
        model = getattr(model, "module", model)  # DDP wraps; the sampler needs the cache methods
        rcfg = replace(self.rollout_config(), schedule="euler", steps=self.scfg.self_history_steps, guidance=1.0)
        rollout = Rollout(model, rcfg)
        idx = torch.tensor(rows, device=x0.device)
        sub = x0[idx]
        cond = {k: batch[k].to(x0.device)[idx] for k in ("actions", "w2c", "K")}
        state = rollout.start(sub[:, :, 0])
        rollout.extend(state, sub[:, :, :start], cond["actions"][:, :start], cond["w2c"][:, :start].float(), cond["K"][:, :start].float())
        for s in range(start, cur, C):
            rollout.step(state, cond["actions"][:, s : s + C], cond["w2c"][:, s : s + C].float(), cond["K"][:, s : s + C].float(),
                         generator=self.generator)
        out = x0.clone()
        out[idx, :, start:cur] = state.latents[:, :, start:cur].to(out.dtype)
        return out

    def _context_sigma(self, B: int, L: int, device: torch.device) -> torch.Tensor:
        """Sigma of context latents [B, L]: the sampler's cache tag, or per-chunk noise up to context_sigma_max."""
        lo = float(self.rollout_config().context_sigma)
        if self.scfg.context_sigma_max <= lo:
            return torch.full((B, L), lo, device=device)
        g = self.generator
        chunks = -(-L // self.scfg.chunk_size)
        u = torch.rand(B, chunks, generator=g, device=g.device) * (self.scfg.context_sigma_max - lo) + lo
        return u.repeat_interleave(self.scfg.chunk_size, dim=1)[:, :L].to(device)

    def _teacher_inputs(self, batch: dict[str, Any], x0: torch.Tensor, step: int) -> ModelInputs:
        """Teacher layout: [union memory | window], full attention, loss on the window. Batch of 1 per layout."""
        W = self.rollout_config().window_latents
        B, _, T = x0.shape[:3]
        if B != 1:
            raise ValueError("stage.mode=bidirectional mid-training builds one memory layout per sample: use data.batch_size=1 (and grad_accum for larger batches)")
        length = curriculum_length(self.scfg.curriculum, step, T)
        starts = list(range(0, length - W + 1, self.scfg.chunk_size))
        if not starts:
            raise ValueError(f"clip of {length} latents is shorter than the teacher window of {W} latents")
        use_memory = float(torch.rand((), generator=self.layout_rng)) < self.scfg.memory_prob
        start = starts[int(torch.randint(len(starts), (), generator=self.layout_rng))] if use_memory else 0
        c2w = batch["c2w"][0].cpu().to(torch.float64)
        lay = teacher_layout(c2w[:start], c2w[start : start + W], self.mem)
        sigma = window_sigmas(1, lay.length, self.scfg, self.generator, x0.device)
        return layout_inputs(clip_inputs(batch, x0, None), [lay], sigma, self._context_sigma(1, lay.length, x0.device))
