"""The elementwise chains of a double-stream block as pure functions, fused by ``torch.compile`` on CUDA.

Between its matmuls and its attention a block runs chains of cheap ops: LayerNorm + AdaLN modulation,
QK RMSNorm + RoPE + the PRoPE group transforms (in fp32) + stacking the two branches' heads, the
PRoPE output transform + head merge, the gated residual. Run op by op they write fp32
intermediates to memory and keep them for the backward; on the ``base`` training step they took a
fifth of the device time (benchmarks/RESULTS.md). Each chain is written once here in plain torch;
:func:`fusable` runs it eagerly (CPU, or ``WorldDiTConfig.fuse=False``) or, for CUDA tensors, through
``torch.compile``, which turns it into a few kernels that read bf16 and write bf16 and recompute
instead of storing.

Shapes: video tokens [B, T*N, D] ordered by frame (N tokens per frame), per-frame vectors [B, T, D],
heads [B, H, S, Dh].
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.prope import transform_groups
from models.rope import apply_rope

__all__ = ["fusable", "rms_norm", "norm_modulate", "gated_residual", "attention_inputs", "attention_outputs"]


def fusable(fn: Callable) -> Callable:
    """``fn(*args, fuse=False)``: eager; ``fuse=True`` with CUDA tensors: ``torch.compile(fn)`` (compiled once, lazily)."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, fuse: bool = False):
        if fuse and args[0].is_cuda:
            if not compiled:
                compiled.append(torch.compile(fn))
            return compiled[0](*args)
        return fn(*args)

    call.eager = fn  # type: ignore[attr-defined]
    return call


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMS normalisation over the last dim in fp32 (times ``weight`` when given), returned in x.dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf if weight is None else xf * weight.float()).to(x.dtype)


def _per_frame(x: Tensor, frames: int) -> Tensor:
    """[B, F*N, D] -> [B, F, N, D] view."""
    B, S, D = x.shape
    return x.view(B, frames, S // frames, D)


@fusable
def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """LayerNorm (no affine, eps 1e-6) then AdaLN: x [B, F*N, D], shift/scale [B, F, D] per frame -> [B, F*N, D]."""
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return (_per_frame(h, frames) * (1 + scale[:, :, None]) + shift[:, :, None]).view(x.shape)


@fusable
def gated_residual(x: Tensor, y: Tensor, gate: Tensor, frames: int) -> Tensor:
    """x + gate * y with a per-frame gate [B, F, D]; x, y [B, F*N, D]."""
    return x + (_per_frame(y, frames) * gate[:, :, None]).view(x.shape)


@fusable
def attention_inputs(qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor | None,
                     sin: Tensor | None, P: Tensor | None, P_inv: Tensor | None, tokens: int,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H', S, Dh] for one attention call from the QKV projection qkv [B, S, 3, H, Dh].

    QK RMSNorm (weights None: no norm), then RoPE (cos None: none). With cameras P / P_inv [B, T, 4, 4]
    the PRoPE branch's P^T q, P^-1 k, P^-1 v (of the normalised, unrotated q/k) are stacked after the
    RoPE branch's heads, H' = 2H: one attention call computes both branches. The results are
    token-major in memory ([B, S, H', Dh] transposed to [B, H', S, Dh] views), so a slice of the first
    tokens of a one-sample batch is dense: the layout the attention kernels read best.
    """
    q, k, v = qkv.unbind(2)  # each [B, S, H, Dh]
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    qr, kr = (q, k) if cos is None else (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    if P is None:
        out = (qr.contiguous(), kr.contiguous(), v.contiguous())
    else:
        qp = transform_groups(q, P, tokens, transpose=True)
        kp = transform_groups(k, P_inv, tokens)
        vp = transform_groups(v, P_inv, tokens)
        out = (torch.cat([qr, qp], dim=2), torch.cat([kr, kp], dim=2), torch.cat([v, vp], dim=2))
    return tuple(t.transpose(1, 2) for t in out)  # type: ignore[return-value]


@fusable
def attention_outputs(o: Tensor, P: Tensor | None, tokens: int) -> tuple[Tensor, Tensor | None]:
    """Merged heads [B, S, H*Dh] of each branch from one attention output o [B, H', S, Dh].

    With cameras (H' = 2H) the second half is the PRoPE branch, brought back by P (P · attn).
    """
    B, Hs, S, Dh = o.shape
    ot = o.transpose(1, 2)  # [B, S, H', Dh]
    if P is None:
        return ot.reshape(B, S, Hs * Dh), None
    H = Hs // 2
    op = transform_groups(ot[:, :, H:], P, tokens)
    return ot[:, :, :H].reshape(B, S, H * Dh), op.reshape(B, S, H * Dh)
