"""3D rotary position embedding on explicit integer (t, h, w) token positions.

Temporal positions come from the caller (one integer per latent frame), so the sampler can give
memory frames any positions it likes (temporal reframing, research/worldplay.md §5.3); h and w are
the token's row and column in the patch grid. The head dimension is split into ``dims = [dt, dh, dw]``
channels (each even); channel pairs (2i, 2i+1) of each axis rotate by ``pos * theta^(-2i/d_axis)``.
Only relative positions survive in q·k, which is what makes reframing (shifting every t) harmless.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_angles", "rope_tables", "apply_rope"]


def _axis_freqs(dim: int, theta: float, device: torch.device) -> Tensor:
    """Inverse frequencies [dim // 2] (float64) of one axis."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def rope_angles(t_pos: Tensor, height: int, width: int, dims: list[int], theta: float) -> Tensor:
    """Rotation angles [B, T*height*width, sum(dims)//2] (float64) for tokens ordered (t, h, w).

    t_pos: [B, T] integer temporal positions of the latent frames.
    """
    if len(dims) != 3 or any(d % 2 or d < 0 for d in dims):
        raise ValueError(f"rope dims must be three even numbers (t, h, w), got {dims}")
    if t_pos.dim() != 2:
        raise ValueError(f"t_pos must be [B, T], got shape {tuple(t_pos.shape)}")
    B, T = t_pos.shape
    dev = t_pos.device
    ft, fh, fw = (_axis_freqs(d, theta, dev) for d in dims)
    at = t_pos.to(torch.float64)[:, :, None] * ft  # [B, T, dt/2]
    ah = torch.arange(height, dtype=torch.float64, device=dev)[:, None] * fh  # [H, dh/2]
    aw = torch.arange(width, dtype=torch.float64, device=dev)[:, None] * fw  # [W, dw/2]
    shape = (B, T, height, width)
    ang = torch.cat(
        [
            at[:, :, None, None, :].expand(*shape, -1),
            ah[None, None, :, None, :].expand(*shape, -1),
            aw[None, None, None, :, :].expand(*shape, -1),
        ],
        dim=-1,
    )
    return ang.reshape(B, T * height * width, -1)


def rope_tables(t_pos: Tensor, height: int, width: int, dims: list[int], theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [B, S, 1, head_dim // 2] float32, ready for :func:`apply_rope` on token-major [B, S, H, D]."""
    ang = rope_angles(t_pos, height, width, dims, theta)[:, :, None]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of x [..., D] by tables broadcastable to [..., D/2] (x token-major [B, S, H, D] with
    tables [B, S, 1, D/2]); computed in fp32, returned in x.dtype."""
    if x.shape[-1] != 2 * cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} does not match tables {tuple(cos.shape)} / {tuple(sin.shape)}")
    try:
        torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1])
    except RuntimeError:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} does not broadcast with tables {tuple(cos.shape)}") from None
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
