"""Reconstituted context memory: which past latents a new chunk attends to, and at which positions.

For each new chunk the context is rebuilt from the whole history (WorldPlay §5.2):

- short histories (``N <= max_context`` latents) are used whole;
- otherwise the context is the last ``temporal_latents`` latents, the first chunk (the *anchor*,
  which carries the conditioning image) and the ``spatial_chunks`` past chunks whose camera frusta
  overlap the new chunk's frusta the most.

A candidate chunk starting at latent ``h`` is scored with WorldPlay's rule

    d(h) = mean_q mean_o (1 - ov(q, h + o)),    o in ref_offsets (WorldPlay: 0 and 2)

over the new chunk's latents ``q``. ``ov(q, r)`` is the fraction of points inside ``q``'s field of
view that are also inside ``r``'s field of view and within ``distance_cut`` of ``r``'s centre;
points fill a ball of radius ``distance_cut`` around ``q`` and all poses are re-expressed in
``q``'s camera frame. "Inside the field of view" is an angular box: the azimuth / elevation of the
direction from the camera to the point differ from those of the camera's forward axis by less than
half the horizontal / vertical FOV (roll is ignored, as in WorldPlay). The smallest ``d`` wins.

The context is then *reframed*: the sorted context latents get contiguous temporal positions
0..M-1 and the new latents M..M+C-1, so RoPE never sees a position beyond the training window.

Training and sampling build their sequences from this rule in one place, ``models.layout``
(:func:`~models.layout.chunk_layout`, :func:`~models.layout.teacher_layout`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from data.geometry import invert_rigid

__all__ = [
    "MemoryConfig",
    "MemoryLayout",
    "context_size",
    "candidate_starts",
    "overlap_points",
    "fov_overlap",
    "chunk_distances",
    "select_context",
    "select_window_context",
    "reframe_positions",
]


@dataclass
class MemoryConfig:
    """Knobs of the context memory (WorldPlay defaults: 12 temporal latents + anchor + 1 spatial chunk = 20)."""

    temporal_latents: int = 12  # most recent latents, always kept (multiple of chunk_size)
    spatial_chunks: int = 1  # retrieved past chunks (by frustum overlap), besides the anchor
    anchor: bool = True  # always include the first chunk (it holds the conditioning image)
    chunk_size: int = 4  # latents per chunk; candidate chunks start at multiples of it
    max_context: int = 20  # latents; a history this short is used whole
    fov_deg: list[float] = field(default_factory=lambda: [60.0, 35.0])  # horizontal, vertical
    distance_cut: float = 8.0  # ball radius around the query camera and distance cut around the reference
    estimator: str = "grid"  # "grid" (deterministic lattice) | "montecarlo" (seeded uniform samples)
    num_points: int = 50_000  # points in the ball (about fov-fraction of them fall in the query's FOV)
    ref_offsets: list[int] = field(default_factory=lambda: [0, 2])  # latents of a candidate chunk that are scored
    seed: int = 0  # montecarlo only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        C = self.chunk_size
        if C < 1:
            raise ValueError(f"MemoryConfig.chunk_size must be >= 1, got {C}")
        if self.temporal_latents < 0 or self.temporal_latents % C:
            raise ValueError(
                f"MemoryConfig.temporal_latents={self.temporal_latents} must be a non-negative multiple of "
                f"chunk_size={C} (the context must stay chunk-aligned for block-causal attention)"
            )
        if self.spatial_chunks < 0:
            raise ValueError(f"MemoryConfig.spatial_chunks must be >= 0, got {self.spatial_chunks}")
        if self.max_context % C:
            raise ValueError(f"MemoryConfig.max_context={self.max_context} must be a multiple of chunk_size={C}")
        needed = self.temporal_latents + C * (int(self.anchor) + self.spatial_chunks)
        if needed > self.max_context:
            raise ValueError(
                f"MemoryConfig: temporal_latents + chunk_size*(anchor + spatial_chunks) = {needed} exceeds "
                f"max_context={self.max_context}; raise max_context or lower the budgets"
            )
        if len(self.fov_deg) != 2 or not all(0.0 < f < 360.0 for f in self.fov_deg):
            raise ValueError(f"MemoryConfig.fov_deg must be [horizontal, vertical] in (0, 360), got {self.fov_deg}")
        if self.fov_deg[1] >= 180.0:
            raise ValueError(f"MemoryConfig.fov_deg vertical must be < 180, got {self.fov_deg[1]}")
        if self.distance_cut <= 0:
            raise ValueError(f"MemoryConfig.distance_cut must be > 0, got {self.distance_cut}")
        if self.estimator not in ("grid", "montecarlo"):
            raise ValueError(f"MemoryConfig.estimator must be 'grid' or 'montecarlo', got {self.estimator!r}")
        if self.num_points < 100:
            raise ValueError(f"MemoryConfig.num_points must be >= 100, got {self.num_points}")
        if not self.ref_offsets or any(not 0 <= o < C for o in self.ref_offsets):
            raise ValueError(
                f"MemoryConfig.ref_offsets must be non-empty and within [0, chunk_size={C}), got {self.ref_offsets}"
            )

    @property
    def spatial_start(self) -> int:
        """First latent a retrieved chunk may start at (the anchor chunk is never a candidate)."""
        return self.chunk_size if self.anchor else 0


# ----------------------------------------------------------------------------------------------
# Frustum overlap
# ----------------------------------------------------------------------------------------------


def _azimuth_elevation(v: Tensor) -> tuple[Tensor, Tensor]:
    """Degrees of azimuth atan2(x, z) and elevation atan2(y, |xz|) of directions [..., 3] (OpenCV axes)."""
    x, y, z = v.unbind(-1)
    az = torch.atan2(x, z) * (180.0 / math.pi)
    el = torch.atan2(y, torch.hypot(x, z)) * (180.0 / math.pi)
    return az, el


@functools.lru_cache(maxsize=8)
def _canonical_points(
    estimator: str, num_points: int, radius: float, fov_h: float, fov_v: float, seed: int
) -> Tensor:
    """Points [P, 3] (float64, CPU) in a ball of ``radius`` that a camera at the origin looking down +z sees."""
    if estimator == "grid":
        # Cell centres of an n^3 lattice on [-1, 1]^3; the ball keeps about pi/6 of them.
        n = max(2, math.ceil((num_points * 6.0 / math.pi) ** (1.0 / 3.0)))
        axis = (torch.arange(n, dtype=torch.float64) * 2.0 + 1.0) / n - 1.0
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        pts = pts[pts.norm(dim=-1) <= 1.0]
    else:
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(num_points, 3, generator=g, dtype=torch.float64)
        r = u[:, 0].pow(1.0 / 3.0)
        phi = 2.0 * math.pi * u[:, 1]
        cos_t = 1.0 - 2.0 * u[:, 2]
        sin_t = (1.0 - cos_t**2).clamp_min(0.0).sqrt()
        pts = torch.stack([r * sin_t * phi.cos(), r * sin_t * phi.sin(), r * cos_t], dim=-1)
    pts = pts * radius
    az, el = _azimuth_elevation(pts)
    keep = (az.abs() < fov_h / 2) & (el.abs() < fov_v / 2)
    return pts[keep].contiguous()


def overlap_points(
    cfg: MemoryConfig, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The query-FOV points [P, 3] of the overlap estimator, in the query camera's frame.

    Points of the ball that the query camera cannot see never count (ov divides by the query's
    in-FOV count), so they are dropped once here; ov(q, r) is then a plain mean over these points.
    """
    fov_h, fov_v = float(cfg.fov_deg[0]), float(cfg.fov_deg[1])
    key = (cfg.estimator, cfg.num_points, float(cfg.distance_cut), fov_h, fov_v, cfg.seed)
    return _points_on(key, torch.device(device) if device is not None else torch.device("cpu"), dtype)


@functools.lru_cache(maxsize=16)
def _points_on(key: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-device copy of the canonical points, so repeated selections do no host-to-device copies."""
    pts = _canonical_points(*key)
    if pts.shape[0] == 0:
        raise ValueError(f"MemoryConfig: no estimator point falls in the FOV {key[3:5]}; raise num_points")
    return pts.to(device=device, dtype=dtype)


def fov_overlap(c2w_query: Tensor, c2w_ref: Tensor, cfg: MemoryConfig) -> Tensor:
    """Overlap ov(q, r) [..., Q, R] (float32) of query cameras [..., Q, 4, 4] with reference cameras [..., R, 4, 4].

    Fraction of the query's visible points (ball of radius distance_cut around q) that r also sees
    within distance_cut of its centre. Vectorised over batch, queries, references and points.
    """
    _check_poses(c2w_query, "c2w_query")
    _check_poses(c2w_ref, "c2w_ref")
    dtype = torch.float64 if c2w_query.device.type == "cpu" else torch.float32
    q = c2w_query.to(dtype)
    r = c2w_ref.to(dtype)
    rel = invert_rigid(q).unsqueeze(-3) @ r.unsqueeze(-4)  # [..., Q, R, 4, 4]: r in q's frame
    centre = rel[..., :3, 3]
    fwd_az, fwd_el = _azimuth_elevation(rel[..., :3, 2])
    pts = overlap_points(cfg, q.device, dtype)  # [P, 3]
    v = pts - centre.unsqueeze(-2)  # [..., Q, R, P, 3]
    az, el = _azimuth_elevation(v)
    d_az = torch.remainder(az - fwd_az.unsqueeze(-1) + 180.0, 360.0) - 180.0
    d_el = el - fwd_el.unsqueeze(-1)  # both in [-90, 90]: no wrap needed
    seen = (d_az.abs() < cfg.fov_deg[0] / 2) & (d_el.abs() < cfg.fov_deg[1] / 2)
    seen = seen & (v.norm(dim=-1) < cfg.distance_cut)
    return seen.float().mean(dim=-1)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def context_size(num_past: int, cfg: MemoryConfig) -> int:
    """Number of context latents M that :func:`select_context` returns for a history of ``num_past`` latents."""
    if num_past <= cfg.max_context:
        return num_past
    spatial = min(cfg.spatial_chunks, len(candidate_starts(num_past, cfg)))
    return cfg.temporal_latents + cfg.chunk_size * (int(cfg.anchor) + spatial)


def candidate_starts(num_past: int, cfg: MemoryConfig) -> list[int]:
    """Chunk-aligned starts of the past chunks that may be retrieved: after the anchor, before the temporal window."""
    end = num_past - cfg.temporal_latents
    return list(range(cfg.spatial_start, end - cfg.chunk_size + 1, cfg.chunk_size))


def chunk_distances(c2w_past: Tensor, c2w_new: Tensor, cfg: MemoryConfig) -> tuple[Tensor, Tensor]:
    """WorldPlay's distance d(h) [..., K] of every candidate chunk, and the candidate starts [K] (int64).

    c2w_past [..., N, 4, 4] are the poses of the history, c2w_new [..., Q, 4, 4] the new chunk's.
    """
    N, C, dev = c2w_past.shape[-3], cfg.chunk_size, c2w_past.device
    # Built on the device (arange, cached offsets): no host-to-device copy, so no stream sync on GPU.
    starts = torch.arange(cfg.spatial_start, N - cfg.temporal_latents - C + 1, C, device=dev)
    offsets = _offsets_on(tuple(cfg.ref_offsets), dev)
    ref_idx = (starts[:, None] + offsets[None, :]).reshape(-1)  # [K*O]
    ov = fov_overlap(c2w_new, c2w_past[..., ref_idx, :, :], cfg)  # [..., Q, K*O]
    ov = ov.unflatten(-1, (starts.numel(), offsets.numel()))
    return (1.0 - ov).mean(dim=(-3, -1)), starts


@functools.lru_cache(maxsize=16)
def _offsets_on(offsets: tuple[int, ...], device: torch.device) -> Tensor:
    # Filled on the device (no host-to-device copy, which would synchronise a CUDA stream).
    return torch.stack([torch.full((), o, dtype=torch.long, device=device) for o in offsets])


def select_context(c2w_past: Tensor, c2w_new: Tensor, cfg: MemoryConfig) -> Tensor:
    """Sorted latent indices [..., M] of the context for a new chunk (M = :func:`context_size`).

    c2w_past [..., N, 4, 4]: poses of all past latents (the history of a rollout, or the latents of
    a training clip before the target); c2w_new [..., C, 4, 4]: the new chunk's poses. Leading
    dims are a batch; every batch element gets the same M. Returns int64 on c2w_past's device.
    """
    _check_poses(c2w_past, "c2w_past")
    _check_poses(c2w_new, "c2w_new")
    if c2w_past.shape[:-3] != c2w_new.shape[:-3]:
        raise ValueError(
            f"select_context: batch dims differ: c2w_past {tuple(c2w_past.shape)} vs c2w_new {tuple(c2w_new.shape)}"
        )
    if c2w_new.shape[-3] < 1:
        raise ValueError("select_context: c2w_new must hold at least one pose (the new chunk)")
    batch = c2w_past.shape[:-3]
    N, C, dev = c2w_past.shape[-3], cfg.chunk_size, c2w_past.device
    if N <= cfg.max_context:
        return torch.arange(N, device=dev).expand(*batch, N)
    parts = [torch.arange(N - cfg.temporal_latents, N, device=dev).expand(*batch, cfg.temporal_latents)]
    if cfg.anchor:
        parts.append(torch.arange(C, device=dev).expand(*batch, C))
    num_starts = len(candidate_starts(N, cfg))
    S = min(cfg.spatial_chunks, num_starts)
    if S > 0:
        dist, starts = chunk_distances(c2w_past, c2w_new, cfg)
        # Stable sort: on ties the earliest chunk wins, as in WorldPlay.
        best = torch.argsort(dist, dim=-1, stable=True)[..., :S]  # [..., S]
        chosen = starts[best].unsqueeze(-1) + torch.arange(C, device=dev)  # [..., S, C]
        parts.append(chosen.flatten(-2))
    return torch.cat(parts, dim=-1).sort(dim=-1).values


def select_window_context(c2w_past: Tensor, c2w_window: Tensor, cfg: MemoryConfig) -> Tensor:
    """Context [M] for a bidirectional window (Context-Forcing teacher layout, WorldPlay ``bi_rollout``).

    c2w_past [N, 4, 4]: history before the window; c2w_window [W, 4, 4] with W a multiple of
    chunk_size. Memory is selected for each chunk-sized sub-window ``i`` from the history up to it
    (past + sub-windows before ``i``); the union minus the window itself, sorted, is the context.
    Unbatched because M depends on the poses (the union of retrieved chunks varies).
    """
    _check_poses(c2w_past, "c2w_past")
    _check_poses(c2w_window, "c2w_window")
    if c2w_past.ndim != 3 or c2w_window.ndim != 3:
        raise ValueError(
            f"select_window_context takes unbatched poses: got c2w_past {tuple(c2w_past.shape)}, "
            f"c2w_window {tuple(c2w_window.shape)}"
        )
    N, W, C = c2w_past.shape[0], c2w_window.shape[0], cfg.chunk_size
    if W % C:
        raise ValueError(f"select_window_context: window of {W} latents is not a multiple of chunk_size={C}")
    full = torch.cat([c2w_past, c2w_window.to(c2w_past)], dim=0)
    picked = torch.zeros(N + W, dtype=torch.bool, device=c2w_past.device)
    for i in range(W // C):  # a handful of sub-windows; everything inside is vectorised
        cur = N + i * C
        idx = select_context(full[:cur], full[cur : cur + C], cfg)
        picked[idx] = True
    return torch.nonzero(picked[:N]).flatten()


def reframe_positions(context_idx: Tensor, num_new: int) -> tuple[Tensor, Tensor]:
    """Contiguous temporal positions: context [..., M] gets 0..M-1, the new latents M..M+num_new-1.

    Real time gaps are dropped (WorldPlay §5.3), so the largest position is M + num_new - 1, which
    never exceeds max_context + chunk_size - 1 for an AR context.
    """
    M = context_idx.shape[-1]
    batch = context_idx.shape[:-1]
    dev = context_idx.device
    ctx = torch.arange(M, device=dev).expand(*batch, M)
    new = torch.arange(M, M + num_new, device=dev).expand(*batch, num_new)
    return ctx, new


def _check_poses(c2w: Tensor, name: str) -> None:
    if not isinstance(c2w, Tensor) or c2w.ndim < 3 or c2w.shape[-2:] != (4, 4):
        shape = tuple(c2w.shape) if isinstance(c2w, Tensor) else type(c2w).__name__
        raise ValueError(f"{name} must be a tensor of poses [..., N, 4, 4], got {shape}")
    if not c2w.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {c2w.dtype}")
