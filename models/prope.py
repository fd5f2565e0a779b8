"""PRoPE: projective positional encoding of each token's camera inside attention (WorldPlay §3.2).

Each latent frame has a projection matrix ``P = lift(K_norm) @ w2c`` (4x4), with
``K_norm = diag(fx, fy, 1)`` taken from *normalised* intrinsics (fx/W, fy/H; the principal point is
zeroed, as in WorldPlay). The head dimension is split into ``head_dim / 4`` groups of 4 channels and
every group of every token is multiplied by its frame's 4x4:

    q' = P^T q,   k' = P^-1 k,   v' = P^-1 v,   out = P · attention(q', k', v')

so ``q'·k' = q^T P_i P_j^-1 k`` and the values are carried by ``P_i P_j^-1``: only the *relative*
camera between the query's and the key's frames enters, and one rigid change of world frame applied
to every camera (w2c -> w2c @ G^-1) changes nothing. ``P^-1`` is computed analytically
(rigid inverse of w2c composed with the diagonal inverse), never with a general matrix inverse.
Identity cameras make every P the same, so the branch then sees no relative camera information:
that is the "no camera" null.
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.geometry import invert_rigid

__all__ = ["projection_matrices", "identity_cameras", "transform_groups"]


def projection_matrices(w2c: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """(P, P^-1), each [..., 4, 4] float32, from w2c [..., 4, 4] and normalised intrinsics K [..., 3, 3]."""
    if w2c.shape[-2:] != (4, 4) or K.shape[-2:] != (3, 3) or w2c.shape[:-2] != K.shape[:-2]:
        raise ValueError(f"PRoPE: expected w2c [..., 4, 4] and K [..., 3, 3] with equal batch dims, "
                         f"got w2c {tuple(w2c.shape)} and K {tuple(K.shape)}")
    w2c = w2c.float()
    fx, fy = K[..., 0, 0].float(), K[..., 1, 1].float()
    one = torch.ones_like(fx)
    scale = torch.stack([fx, fy, one, one], dim=-1)  # diag of lift(K_norm)
    P = scale[..., :, None] * w2c  # lift(K) @ w2c scales the rows
    P_inv = invert_rigid(w2c) / scale[..., None, :]  # c2w @ lift(K)^-1 scales the columns
    return P, P_inv


def identity_cameras(batch: int, frames: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(P, P^-1) = identity for every frame: the "no camera" null, [batch, frames, 4, 4]."""
    eye = torch.eye(4, device=device).expand(batch, frames, 4, 4)
    return eye, eye


def transform_groups(x: Tensor, M: Tensor, tokens_per_frame: int, transpose: bool = False) -> Tensor:
    """Multiply every 4-channel group of every token by its frame's matrix.

    x: token-major [B, T*N, H, D] (tokens ordered by frame, N = tokens_per_frame, D % 4 == 0);
    M: [B, T, 4, 4]. Returns M @ x_g (or M^T @ x_g when ``transpose``) per group, in fp32 then cast
    back to x.dtype. Written as four broadcast multiply-adds rather than a batched matmul: 4x4 products
    are memory-bound, and in this form ``torch.compile`` fuses them with the ops around them
    (models/fused.py) instead of running an fp32 GEMM.
    """
    B, S, H, D = x.shape
    T = M.shape[1]
    if M.shape[0] != B or M.shape[-2:] != (4, 4) or S != T * tokens_per_frame or D % 4:
        raise ValueError(f"PRoPE: x {tuple(x.shape)} does not match matrices {tuple(M.shape)} "
                         f"with {tokens_per_frame} tokens per frame (head_dim must be a multiple of 4)")
    xg = x.float().reshape(B, T, tokens_per_frame, H, D // 4, 4)
    Mf = M.float().transpose(-1, -2) if transpose else M.float()
    cols = Mf[:, :, None, None, None]  # [B, T, 1, 1, 1, 4 rows, 4 cols]
    out = cols[..., 0] * xg[..., 0:1]
    for j in range(1, 4):
        out = out + cols[..., j] * xg[..., j:j + 1]
    return out.reshape(B, S, H, D).to(x.dtype)
