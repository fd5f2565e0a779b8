"""The student's self-rollout and the teacher's context (WorldPlay Alg. 1, research/worldplay.md §6.3).

:func:`self_rollout` is the inference sampler (``models.rollout.Rollout``) run the way distillation
needs: a real-video history pushed in with ``Rollout.extend``, then ``chunks`` chunks sampled with the
4-step distilled schedule (fresh-noise re-noising), every chunk stopping at the same exit step, the
gradient kept through that step only (``grad_step = exit_step``). The sampler commits each chunk's
clean prediction x̂0 at the exit step to the history, so the next chunk's memory (reconstituted from
the history, including the student's own earlier chunks) and its KV cache are rebuilt from that clean
output, detached (``detach_context``). With gradients off and the exit at the last step this *is*
inference (tests/test_distill.py checks it against a bundle's own sampler).

:func:`teacher_layouts` builds what the teacher and the fake score see (``distill.teacher_context``):
``aligned`` (Context Forcing): the union of the memories the student's chunks used, minus the generated
window, then the window, contiguous positions (``models.layout.aligned_layout``); ``window`` / ``none``:
the window alone (``models.layout.window_layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from models.layout import Layout, aligned_layout, window_layout
from models.rollout import ChunkRecord, Rollout, RolloutState

__all__ = ["SamplerView", "SelfRollout", "self_rollout", "teacher_layouts", "group_layouts", "prefix_state"]


class SamplerView:
    """A role's module as the rollout sampler uses it: forward calls go through the (possibly DDP-wrapped)
    module, so a differentiable call synchronises its gradients; the cache methods, parameters and config
    come from the raw WorldDiT inside."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.raw = getattr(module, "module", module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # new_cache, fill_text_cache, fill_context_cache, parameters, modules
        return getattr(self.raw, name)


@dataclass
class SelfRollout:
    """A student rollout: the sampler state (history = real prefix + generated window) and its chunk records."""

    state: RolloutState
    records: list[ChunkRecord]
    history: int  # real latents before the window
    window: Tensor  # [B, C, W, h, w] the chunks' x̂0 at their exit step (graph through those calls when grad)
    pinned: Tensor  # [B, W] bool: window latents that are the conditioning image (no loss)
    exit_step: int

    @property
    def length(self) -> int:
        return self.window.shape[2]


def self_rollout(
    rollout: Rollout,
    x0: Tensor,
    actions: Tensor,
    w2c: Tensor,
    K: Tensor,
    *,
    history: int,
    chunks: int,
    exit_step: int,
    generator: Optional[torch.Generator],
    grad: bool,
    text: Optional[Tensor] = None,
    text_mask: Optional[Tensor] = None,
) -> SelfRollout:
    """Roll ``chunks`` chunks out after ``history`` real latents of x0 [B, C, T, h, w] (image = latent 0).

    actions [B, T], w2c [B, T, 4, 4], K [B, T, 3, 3] (normalised) cover at least history + chunks·chunk_size
    latents. ``grad``: the exit-step call of every chunk keeps its graph (all earlier calls and every
    cache fill run without one); otherwise nothing does.
    """
    C = rollout.cfg.chunk_size
    if rollout.cfg.mode != "ar":
        raise ValueError("self_rollout: the student samples chunk by chunk (ar mode)")
    end = history + chunks * C
    if history % C or history < 0 or end > x0.shape[2] or end > actions.shape[1]:
        raise ValueError(f"self_rollout: a history of {history} latents (a multiple of {C}) and {chunks} chunks need "
                         f"{end} latents, the clip has {x0.shape[2]}")
    state = rollout.start(x0[:, :, 0], text, text_mask)
    if history:
        rollout.extend(state, x0[:, :, :history], actions[:, :history], w2c[:, :history], K[:, :history])
    records = []
    for i in range(chunks):
        sl = slice(history + i * C, history + (i + 1) * C)
        records.append(rollout.step(state, actions[:, sl], w2c[:, sl], K[:, sl], generator,
                                    grad_step=exit_step if grad else None, exit_step=exit_step))
    window = torch.cat([r.latents for r in records], dim=2)
    B = x0.shape[0]
    pinned = torch.cat([r.pinned if r.pinned is not None else torch.zeros(B, C, dtype=torch.bool, device=x0.device)
                        for r in records], dim=1)
    return SelfRollout(state, records, history, window, pinned.to(x0.device), exit_step)


def teacher_layouts(sr: SelfRollout, mode: str) -> list[Layout]:
    """One layout per sample ([1, M_b + W], on the host) of what the teacher and fake score see for the window.

    Built on the host from one copy of the chunks' context indices, so the data-dependent union costs one
    device sync per rollout; ``Rollout.context`` moves the layout to the device.
    """
    B, W = sr.window.shape[0], sr.length
    if mode == "aligned":
        contexts = [r.context_idx.cpu() for r in sr.records]
        return [aligned_layout([c[b] for c in contexts], sr.history, W) for b in range(B)]
    if mode in ("window", "none"):
        return [window_layout(1, sr.history, W)] * B
    raise ValueError(f"teacher_context must be aligned | window | none, got {mode!r}")


def group_layouts(layouts: list[Layout]) -> list[tuple[Tensor, Layout]]:
    """Samples whose layouts have the same context size, batched: [(rows [n] int64, Layout [n, M + W])]."""
    groups: dict[int, list[int]] = {}
    for b, lay in enumerate(layouts):
        groups.setdefault(lay.num_context, []).append(b)
    out = []
    for M, rows in sorted(groups.items()):
        dev = layouts[rows[0]].indices.device
        idx = torch.cat([layouts[b].indices for b in rows])
        pos = torch.cat([layouts[b].positions for b in rows])
        out.append((torch.tensor(rows, dtype=torch.long, device=dev), Layout(idx, pos, M)))
    return out


def prefix_state(rollout: Rollout, sr: SelfRollout, rows: Tensor) -> RolloutState:
    """A state over samples ``rows`` of the rollout whose history is the real prefix only (detached): the
    history a window-mode (teacher) call gathers its context from, the window itself being the new latents."""
    st = sr.state
    pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
    state = rollout.start(pick(st.image_latent), pick(st.text), pick(st.text_mask),
                          neg_text=pick(st.neg_text), neg_text_mask=pick(st.neg_text_mask))
    if sr.history:
        h = sr.history
        rollout.extend(state, pick(st.latents)[:, :, :h].detach(), pick(st.actions)[:, :h], pick(st.w2c)[:, :h], pick(st.K)[:, :h])
    return state
