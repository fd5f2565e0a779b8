"""Reconstituted context memory: FOV overlap, WorldPlay's selection rule, reframing, training layouts."""

import math

import pytest
import torch

from data.geometry import make_pose, rotation_y
from models.memory import (
    MemoryConfig,
    candidate_starts,
    chunk_distances,
    context_size,
    fov_overlap,
    overlap_points,
    reframe_positions,
    select_context,
    select_window_context,
)


def walk(segments: list[tuple[int, float, float]], start: torch.Tensor | None = None) -> torch.Tensor:
    """Latent poses [N, 4, 4]: latent 0 at ``start``; each segment (n, step, yaw) appends n latents,
    each yawing by ``yaw`` degrees then moving ``step`` along the new forward axis (camera frame)."""
    c2w = torch.eye(4, dtype=torch.float64) if start is None else start.double()
    out = [c2w]
    for n, step, yaw in segments:
        for _ in range(n):
            c2w = c2w @ make_pose(rotation_y(yaw), torch.tensor([0.0, 0.0, step], dtype=torch.float64))
            out.append(c2w)
    return torch.stack(out).float()


def pose(x: float = 0.0, z: float = 0.0, yaw: float = 0.0) -> torch.Tensor:
    return make_pose(rotation_y(yaw), torch.tensor([x, 0.0, z], dtype=torch.float64)).float()


# ---------------------------------------------------------------- overlap estimator


def test_overlap_analytic_cases():
    cfg = MemoryConfig()
    q = pose()[None]
    refs = torch.stack([pose(), pose(yaw=30.0), pose(yaw=180.0), pose(z=-20.0), pose(x=20.0, yaw=-90.0)])
    ov = fov_overlap(q, refs, cfg)[0]
    assert ov[0] == 1.0  # same camera
    assert ov[1] == 0.5  # yawed by half the horizontal FOV: the grid is mirror-symmetric, so exactly half
    assert ov[2] == 0.0  # looking the other way
    assert ov[3] == 0.0  # 20 units behind: every visible point is beyond the distance cut
    assert ov[4] == 0.0  # far to the side


def test_overlap_distance_cut_and_backoff():
    cfg = MemoryConfig()
    q = pose()[None]
    # A camera 4 units straight behind sees all of q's cone angularly, so ov is exactly the share of
    # q's visible points within the distance cut of it.
    back = fov_overlap(q, pose(z=-4.0)[None], cfg)[0, 0]
    pts = overlap_points(cfg, dtype=torch.float64)
    behind = torch.tensor([0.0, 0.0, -4.0], dtype=torch.float64)
    expect = ((pts - behind).norm(dim=-1) < cfg.distance_cut).double().mean()
    assert math.isclose(float(back), float(expect), abs_tol=1e-6)
    assert 0.08 < back < 0.2  # volume grows as r^2: about (4/8)^3 of the cone is that close
    ahead = fov_overlap(q, pose(z=2.0)[None], cfg)[0, 0]
    assert 0.3 < ahead < 1.0  # misses the points between the two cameras and near the cone's edge
    assert fov_overlap(q, pose(z=2.0)[None], MemoryConfig(distance_cut=4.0))[0, 0] < ahead


def test_overlap_is_invariant_to_world_frame():
    cfg = MemoryConfig()
    g = torch.Generator().manual_seed(0)
    scale_q, scale_r = torch.tensor([1.0, 20.0]), torch.tensor([2.0, 20.0])
    q = torch.stack([pose(x=float(x), yaw=float(y)) for x, y in torch.randn(3, 2, generator=g) * scale_q])
    r = torch.stack([pose(z=float(z), yaw=float(y)) for z, y in torch.randn(5, 2, generator=g) * scale_r])
    world = pose(x=3.0, z=-7.0, yaw=77.0)
    a = fov_overlap(q, r, cfg)
    b = fov_overlap(world @ q, world @ r, cfg)
    assert torch.allclose(a, b, atol=2e-3)  # only boundary points may flip under float32 round-off
    assert a.std() > 0.05  # the case is not trivial


def test_overlap_batched_matches_pairwise():
    cfg = MemoryConfig(num_points=5000)
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(2 * 7, 3, generator=g) * 3.0
    cams = torch.stack([pose(x=float(a), z=float(b), yaw=float(c)) for a, b, c in rnd])
    cams = cams.view(2, 7, 4, 4)
    ov = fov_overlap(cams[:, :3], cams[:, 3:], cfg)  # [2, 3, 4]
    assert ov.shape == (2, 3, 4)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                assert ov[b, i, j] == fov_overlap(cams[b, i : i + 1], cams[b, 3 + j : 4 + j], cfg)[0, 0]


def test_grid_is_deterministic_and_montecarlo_agrees():
    g = torch.Generator().manual_seed(2)
    q = torch.stack([pose(x=float(a), z=float(b), yaw=float(c)) for a, b, c in torch.randn(4, 3, generator=g) * 2.0])
    r = torch.stack([pose(x=float(a), z=float(b), yaw=float(c)) for a, b, c in torch.randn(6, 3, generator=g) * 2.0])
    grid = fov_overlap(q, r, MemoryConfig())
    assert torch.equal(grid, fov_overlap(q, r, MemoryConfig()))
    mc = fov_overlap(q, r, MemoryConfig(estimator="montecarlo", seed=5))
    assert torch.equal(mc, fov_overlap(q, r, MemoryConfig(estimator="montecarlo", seed=5)))
    assert not torch.equal(mc, fov_overlap(q, r, MemoryConfig(estimator="montecarlo", seed=6)))
    assert (mc - grid).abs().max() < 0.04  # ~2.5k points in the FOV: Monte-Carlo std <= 0.01
    assert grid.max() > 0.2 and grid.min() < 0.1


# ---------------------------------------------------------------- selection rule


def test_short_history_is_used_whole():
    cfg = MemoryConfig()
    for n in (0, 4, 12, 20):
        c2w = walk([(n, 0.5, 0.0)])[:n]
        new = walk([(4, 0.5, 0.0)], start=c2w[-1] if n else None)[1:]
        idx = select_context(c2w, new, cfg)
        assert torch.equal(idx, torch.arange(n))
        assert context_size(n, cfg) == n


def test_out_and_back_retrieves_the_chunk_seen_at_the_same_place():
    # Out 8 chunks along +z (0.5/latent), turn around, walk back 5 chunks, turn around again and walk
    # forward: the new chunk covers z = 6.0..7.5 facing +z, which outbound chunk 3 (latents 12-15) saw.
    c2w = walk([(31, 0.5, 0.0), (4, 0.0, 45.0), (19, 0.5, 0.0), (1, 0.5, 0.0), (4, 0.0, 45.0)])
    c2w_past, c2w_new = c2w[:60], walk([(4, 0.5, 0.0)], start=c2w[59])[1:]
    assert torch.allclose(c2w_new[0, :3, 3], torch.tensor([0.0, 0.0, 6.0]), atol=1e-4)
    cfg = MemoryConfig()
    idx = select_context(c2w_past, c2w_new, cfg)
    assert idx.tolist() == [0, 1, 2, 3, 12, 13, 14, 15] + list(range(48, 60))
    dist, starts = chunk_distances(c2w_past, c2w_new, cfg)
    assert starts.tolist() == candidate_starts(60, cfg) == list(range(4, 48, 4))
    best = int(starts[dist.argmin()])
    assert best == 12
    # Along the outbound leg the distance falls towards the same place and rises after it.
    outbound = dist[:7]  # starts 4..28, z = 2..14
    assert (outbound[:2].diff() < 0).all() and (outbound[2:].diff() > 0).all()
    assert dist.sort().values[1] > dist.min() + 0.2


def test_revisit_after_detour_retrieves_the_old_chunk():
    # A closed rectangle: +z 3 chunks, turn right, +x 2 chunks, turn right, -z 3 chunks, turn right,
    # -x 2 chunks, turn right: back at the pose of latent 3; then the new chunk repeats chunk 1.
    seg = [(3, 0.0, 0.0), (12, 0.5, 0.0), (4, 0.0, 22.5), (8, 0.5, 0.0), (4, 0.0, 22.5), (12, 0.5, 0.0)]
    seg += [(4, 0.0, 22.5), (8, 0.5, 0.0), (4, 0.0, 22.5)]
    c2w = walk(seg)
    assert torch.allclose(c2w[-1], c2w[3], atol=1e-4)
    N = c2w.shape[0]
    assert N % 4 == 0
    new = walk([(4, 0.5, 0.0)], start=c2w[-1])[1:]
    assert torch.allclose(new, c2w[4:8], atol=1e-4)  # chunk 1 again
    cfg = MemoryConfig(anchor=False, spatial_chunks=2)
    idx = select_context(c2w, new, cfg)
    dist, starts = chunk_distances(c2w, new, cfg)
    order = starts[torch.argsort(dist)].tolist()
    assert order[0] == 4  # exactly the same poses
    d = dict(zip(starts.tolist(), dist.tolist()))
    assert d[4] + 0.1 < min(v for k, v in d.items() if k != 4)
    assert set(range(4, 8)) <= set(idx.tolist())
    # With the anchor on, chunk 0 is always in and chunk 1 is the retrieved one.
    idx = select_context(c2w, new, MemoryConfig())
    assert idx.tolist() == list(range(8)) + list(range(N - 12, N))


def test_selection_is_batched_and_sorted():
    g = torch.Generator().manual_seed(3)
    steps = torch.randn(3, 40, 2, generator=g)
    trajs = []
    for b in range(3):
        segs = [(1, 0.3 + 0.2 * float(steps[b, i, 0].abs()), 40.0 * float(steps[b, i, 1])) for i in range(40)]
        trajs.append(walk(segs))
    c2w = torch.stack(trajs)  # [3, 41, 4, 4]
    past, new = c2w[:, :36], c2w[:, 36:40]
    cfg = MemoryConfig(spatial_chunks=2, max_context=24)
    idx = select_context(past, new, cfg)
    assert idx.shape == (3, context_size(36, cfg)) == (3, 24)
    for b in range(3):
        one = select_context(past[b], new[b], cfg)
        assert torch.equal(idx[b], one)
        assert torch.equal(one, one.sort().values) and one.unique().numel() == one.numel()
        assert set(range(24, 36)) <= set(one.tolist()) and {0, 1, 2, 3} <= set(one.tolist())
        # The retrieved chunks are the two smallest distances.
        dist, starts = chunk_distances(past[b], new[b], cfg)
        best = starts[torch.argsort(dist, stable=True)[:2]]
        for s in best.tolist():
            assert set(range(s, s + 4)) <= set(one.tolist())


def test_positions_stay_in_the_training_window():
    from models.layout import chunk_layout

    cfg = MemoryConfig()
    c2w = walk([(200, 0.3, 7.0)])
    for cur in range(4, 200, 4):
        lay = chunk_layout(c2w[None, :cur], c2w[None, cur : cur + 4], cfg)
        assert lay.positions.max() <= cfg.max_context + cfg.chunk_size - 1
        assert torch.equal(lay.positions[0], torch.arange(lay.length))
        assert torch.equal(lay.new_idx[0], torch.arange(cur, cur + 4))
        assert (lay.context_idx < cur).all()
        assert lay.new_mask.sum() == 4 and lay.new_mask[0, -4:].all()
    ctx, new = reframe_positions(torch.tensor([0, 1, 2, 3, 28, 29, 30, 31, 40, 41]), 4)
    assert ctx.tolist() == list(range(10)) and new.tolist() == [10, 11, 12, 13]


def test_window_context_is_union_minus_window():
    cfg = MemoryConfig()
    c2w = walk([(31, 0.5, 0.0), (4, 0.0, 45.0), (27, 0.5, 0.0), (4, 0.0, 45.0), (29, 0.5, 0.0)])
    past, window = c2w[:80], c2w[80:96]
    ctx = select_window_context(past, window, cfg)
    assert (ctx < 80).all() and torch.equal(ctx, ctx.sort().values)
    expect = set()
    for i in range(4):
        cur = 80 + 4 * i
        expect |= set(select_context(c2w[:cur], c2w[cur : cur + 4], cfg).tolist())
    assert set(ctx.tolist()) == {i for i in expect if i < 80}
    assert set(range(68, 80)) <= set(ctx.tolist())  # the first sub-window's temporal memory
    from models.layout import teacher_layout

    lay = teacher_layout(c2w[:80], c2w[80:96], cfg)
    assert torch.equal(lay.context_idx[0], ctx) and lay.positions[0].tolist() == list(range(ctx.numel() + 16))
    # Early windows: the whole history.
    assert torch.equal(select_window_context(c2w[:8], c2w[8:24], cfg), torch.arange(8))


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="temporal_latents"):
        MemoryConfig(temporal_latents=10)
    with pytest.raises(ValueError, match="max_context"):
        MemoryConfig(spatial_chunks=3)
    with pytest.raises(ValueError, match="ref_offsets"):
        MemoryConfig(ref_offsets=[0, 4])
    with pytest.raises(ValueError, match="estimator"):
        MemoryConfig(estimator="exact")
    with pytest.raises(ValueError, match=r"c2w_past must be a tensor of poses \[..., N, 4, 4\]"):
        select_context(torch.zeros(10, 3, 4), torch.zeros(4, 4, 4), MemoryConfig())
    with pytest.raises(ValueError, match="batch dims differ"):
        select_context(torch.zeros(2, 10, 4, 4), torch.zeros(4, 4, 4), MemoryConfig())
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        select_window_context(walk([(10, 0.5, 0.0)]), walk([(5, 0.5, 0.0)])[:6], MemoryConfig())


def test_fov_box_matches_angles():
    # A camera pitched up by more than half the vertical FOV shares nothing with a level camera.
    from data.geometry import rotation_x

    cfg = MemoryConfig()
    up = make_pose(rotation_x(40.0), torch.zeros(3, dtype=torch.float64)).float()
    assert fov_overlap(pose()[None], up[None], cfg)[0, 0] == 0.0
    half = make_pose(rotation_x(17.5), torch.zeros(3, dtype=torch.float64)).float()
    ov = fov_overlap(pose()[None], half[None], cfg)[0, 0]
    assert abs(ov - 0.5) < 0.02  # half the vertical box, up to the grid's vertical asymmetry
    assert math.isclose(float(fov_overlap(half[None], half[None], cfg)[0, 0]), 1.0)
