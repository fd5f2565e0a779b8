"""The procedural synthetic world: determinism, exact geometry (projection and depth), key-driven
trajectories (revisits, collisions, key/pose consistency) and the dataset CLI."""

import math

import numpy as np
import pytest
import torch

from data.actions import keys_to_poses, poses_to_keys
from data.contract import validate_clip
from data.geometry import invert_rigid, make_intrinsics, make_pose, project, rotation_x, rotation_y
from data.latents import latent_keys_from_frames, latent_poses
from data.synthetic import (
    Box,
    Cylinder,
    Scene,
    SceneConfig,
    Sphere,
    SyntheticConfig,
    TrajectoryConfig,
    frame_steps,
    make_clip,
    make_trajectory,
    plan_trajectory,
    render,
)
from data.synthetic.scene import BOX, CYLINDER
from data.synthetic.trajectories import inverse_keys

torch.set_num_threads(1)


def _pose(yaw: float, pitch: float, pos) -> torch.Tensor:
    return make_pose(rotation_y(yaw) @ rotation_x(pitch), torch.tensor(pos, dtype=torch.float64))


def _small(**kw) -> SyntheticConfig:
    return SyntheticConfig(num_frames=kw.pop("num_frames", 9), height=24, width=32, **kw)


# ------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_scene_and_frames_different_seed_differs():
    a, b = make_clip(11, _small()), make_clip(11, _small())
    for key in ("video", "depth", "c2w", "K", "keys"):
        assert np.array_equal(a[key], b[key]), key
    assert a["meta"] == b["meta"] and a["caption"] == b["caption"]
    validate_clip(a)
    c = make_clip(12, _small())
    assert not np.array_equal(a["video"], c["video"])
    s1, s2 = Scene.random(5), Scene.random(5)
    assert torch.equal(s1.center, s2.center) and torch.equal(s1.materials.color1, s2.materials.color1)
    assert not torch.equal(Scene.random(6).center[:1], s1.center[:1])


def test_clip_meta_and_frames_move():
    clip = make_clip(3, _small(num_frames=17, trajectory="random"))
    meta = clip["meta"]
    assert meta["source"] == "synthetic" and meta["trajectory"] == "random" and meta["fps"] == 16.0
    assert meta["scene_seed"] == 3 and meta["stride"] == 4
    rebuilt = Scene.random(meta["scene_seed"], SceneConfig(**meta["scene_config"]))
    assert torch.equal(rebuilt.center, Scene.random(3).center)
    assert clip["depth"].dtype == np.float32 and clip["depth"].shape == clip["video"].shape[:3]
    assert np.isclose(meta["step_translation"] * meta["stride"], 0.08)
    assert np.isclose(meta["step_rotation_deg"] * meta["stride"], 3.0)


# ------------------------------------------------------------------------------------------------
# Geometry: projection and depth


def _depth_diff_mask(scene_with, scene_without, c2w, K, H, W):
    _, d1 = render(scene_with, c2w, K, H, W)
    _, d0 = render(scene_without, c2w, K, H, W)
    return d1, d1 < d0 - 1e-4


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (25.0, 8.0), (-40.0, -12.0), (130.0, 5.0)])
def test_marker_sphere_projects_where_K_w2c_puts_it(yaw, pitch):
    H, W = 48, 64
    K = torch.tensor([[40.0, 0.0, 29.0], [0.0, 44.0, 26.5], [0.0, 0.0, 1.0]])  # fx != fy, off-centre principal point
    cam = _pose(yaw, pitch, [0.4, -1.3, -0.2])
    # Marker 2.5 units ahead of the camera, offset so it lands off the image centre.
    target = (cam @ torch.tensor([0.5, -0.3, 2.5, 1.0], dtype=torch.float64))[:3]
    r = 0.12
    empty = Scene.build(6.0, 6.0, 3.0, [], seed=1)
    marked = Scene.build(6.0, 6.0, 3.0, [Sphere(float(target[0]), float(target[2]), r, y=float(target[1]))], seed=1)
    depth, mask = _depth_diff_mask(marked, empty, cam[None].float(), K, H, W)
    ii, jj = mask[0].nonzero(as_tuple=True)
    assert len(ii) >= 8
    centroid = torch.stack([jj.double().mean() + 0.5, ii.double().mean() + 0.5])
    uv, z = project(K.double(), invert_rigid(cam), target[None])
    assert torch.dist(centroid, uv[0]) < 0.5, (centroid, uv)
    # The nearest rendered z-depth is the sphere's front point: z(centre) - r, up to pixel sampling.
    dmin = float(depth[0][mask[0]].min())
    assert float(z) - r - 1e-4 <= dmin <= float(z) - r + 0.01


@pytest.mark.parametrize("pitch", [0.0, 10.0, -10.0])
def test_box_edge_projects_where_K_w2c_puts_it(pitch):
    """A box's silhouette edge in every row sits within 1 px of the projected 3D edge."""
    H, W = 64, 64
    K = make_intrinsics(70.0, W, H)
    cam = _pose(0.0, pitch, [0.0, -1.2, -3.0])
    box = Box(x=0.3, z=0.0, half_x=0.5, half_z=0.4, height=2.2)
    scene = Scene.build(6.0, 6.0, 3.0, [box], seed=2)
    empty = Scene.build(6.0, 6.0, 3.0, [], seed=2)
    _, mask = _depth_diff_mask(scene, empty, cam[None].float(), K, H, W)
    # The box spans x in [-0.2, 0.8] and the camera is at x = 0, so the box's -x face is turned
    # away and its left silhouette is the front-left vertical edge (x = -0.2, z = -0.4).
    edge = torch.tensor([[box.x - box.half_x, -0.1, -box.half_z], [box.x - box.half_x, -2.1, -box.half_z]], dtype=torch.float64)
    uv, _ = project(K.double(), invert_rigid(cam), edge)
    checked = 0
    for i in range(H):
        v = i + 0.5
        lo, hi = sorted([float(uv[0, 1]), float(uv[1, 1])])
        if not lo + 1 < v < hi - 1:
            continue
        s = (v - float(uv[0, 1])) / float(uv[1, 1] - uv[0, 1])
        u_edge = float(uv[0, 0] + s * (uv[1, 0] - uv[0, 0]))
        cols = mask[0, i].nonzero()
        assert len(cols), f"row {i}: box not found"
        first = int(cols[0]) + 0.5  # centre of the first box pixel; the previous centre is not on the box
        assert first - 1.0 - 1e-6 <= u_edge <= first + 1e-6, (i, first, u_edge)
        checked += 1
    assert checked > 20


def test_wall_depth_is_its_distance_and_floor_depth_is_the_plane_intersection():
    H, W = 40, 40
    K = make_intrinsics(60.0, W, H)
    room = Scene.build(5.0, 4.0, 3.0, [], seed=3)
    cam = _pose(0.0, 0.0, [0.7, -1.5, 1.0])  # facing the +z wall 3 units away, level
    _, depth = render(room, cam[None].float(), K, H, W)
    # Fronto-parallel wall: the z-depth of every wall pixel is the distance to the wall.
    # Rows whose ray reaches the wall before the floor/ceiling: |v - cy| / fy * 3 < 1.5.
    fy = float(K[1, 1])
    rows = [i for i in range(H) if abs(i + 0.5 - H / 2) / fy * 3.0 < 1.45]
    assert torch.allclose(depth[0, rows], torch.full_like(depth[0, rows], 3.0), atol=1e-5)
    # Every pixel of a pitched, yawed view of the empty room equals the analytic nearest plane.
    cam = _pose(33.0, -20.0, [0.7, -1.5, 1.0])
    _, depth = render(room, cam[None].float(), K, H, W)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K.double()).T @ cam[:3, :3].T  # [H, W, 3]
    o = cam[:3, 3]
    lo = torch.tensor([-5.0, -3.0, -4.0], dtype=torch.float64)
    hi = torch.tensor([5.0, 0.0, 4.0], dtype=torch.float64)
    t_planes = torch.cat([(lo - o) / rays, (hi - o) / rays], -1)
    expected = torch.where(t_planes > 0, t_planes, torch.inf).amin(-1)
    assert torch.allclose(depth[0].double(), expected, rtol=1e-5)
    t_floor = torch.where(rays[..., 1] > 0, -o[1] / rays[..., 1], torch.inf)  # the plane y = 0
    floor = t_floor <= torch.where(t_planes > 0, t_planes, torch.inf)[..., [0, 2, 3, 5]].amin(-1)  # nearer than the walls
    assert floor.sum() > 100
    assert torch.allclose(depth[0].double()[floor], t_floor[floor], rtol=1e-5)


def _sdf(scene: Scene, p: torch.Tensor) -> torch.Tensor:
    """Signed distances [M, N] (float64) of points p [M, 3] to every object (independent of the renderer)."""
    c, h, yaw, kind = scene.center.double(), scene.half.double(), scene.yaw.double(), scene.kind
    q = p[:, None, :] - c
    cs, sn = torch.cos(yaw), torch.sin(yaw)
    lx, ly, lz = cs * q[..., 0] - sn * q[..., 2], q[..., 1], sn * q[..., 0] + cs * q[..., 2]
    e = torch.stack([lx.abs(), ly.abs(), lz.abs()], -1) - h
    box = e.clamp_min(0).norm(dim=-1) + e.amax(-1).clamp_max(0)
    rad = torch.stack([torch.hypot(lx, lz) - h[:, 0], ly.abs() - h[:, 1]], -1)
    cyl = rad.clamp_min(0).norm(dim=-1) + rad.amax(-1).clamp_max(0)
    sph = q.norm(dim=-1) - h[:, 0]
    return torch.where(kind == BOX, box, torch.where(kind == CYLINDER, cyl, sph))


def _room_sdf(scene: Scene, p: torch.Tensor) -> torch.Tensor:
    """Distance [M] of points inside the room to its nearest face (negative outside)."""
    x, y, z = p.unbind(-1)
    return torch.stack([scene.half_x - x.abs(), scene.half_z - z.abs(), -y, y + scene.height], -1).amin(-1)


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_depth_backprojects_onto_scene_surfaces(seed):
    """Every pixel's depth, lifted to 3D, lies on some surface and inside no object."""
    H, W = 32, 40
    scene = Scene.random(seed)
    keys, c2w = make_trajectory("random", scene, 9, np.random.default_rng(seed))
    K = make_intrinsics(90.0, W, H)
    _, depth = render(scene, c2w[::4].float(), K, H, W)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    cam_pts = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(K.double()).T  # z = 1
    for f in range(depth.shape[0]):
        pts_cam = cam_pts * depth[f].double()[..., None]
        pts = (pts_cam.reshape(-1, 3) @ c2w[4 * f, :3, :3].T) + c2w[4 * f, :3, 3]
        sdf = _sdf(scene, pts)
        on_surface = torch.minimum(sdf.abs().amin(-1), _room_sdf(scene, pts).abs())
        assert float(on_surface.max()) < 2e-3
        assert float(sdf.min()) > -2e-3  # never inside an object: nothing is seen through
        assert float(_room_sdf(scene, pts).min()) > -2e-3


def test_per_frame_K_matches_shared_K_and_bad_inputs_raise():
    scene = Scene.random(2)
    _, c2w = make_trajectory("orbit", scene, 5, np.random.default_rng(0))
    K = make_intrinsics(80.0, 20, 16)
    rgb1, d1 = render(scene, c2w.float(), K, 16, 20)
    rgb2, d2 = render(scene, c2w.float(), K.expand(5, 3, 3), 16, 20)
    assert torch.equal(rgb1, rgb2) and torch.equal(d1, d2)
    assert rgb1.dtype == torch.uint8 and rgb1.shape == (5, 16, 20, 3) and d1.dtype == torch.float32
    with pytest.raises(ValueError, match="c2w"):
        render(scene, c2w[0].float(), K, 16, 20)
    with pytest.raises(ValueError, match="K has 3 frames"):
        render(scene, c2w.float(), K.expand(3, 3, 3), 16, 20)


# ------------------------------------------------------------------------------------------------
# Trajectories


def test_revisit_returns_to_exact_poses_and_frames():
    scene = Scene.random(7)
    traj = plan_trajectory("revisit", scene, 33, np.random.default_rng(1))  # 8 latents: 4 out, 4 back
    m, q = traj.info["turn_frame"], traj.info["pause_frames"]
    assert (m, q) == (16, 0) and traj.kind == "revisit"
    F = traj.c2w.shape[0]
    partner = [2 * m + q - j for j in range(m + q, F)]
    for j, k in zip(range(m + q, F), partner):
        assert torch.equal(traj.c2w[j], traj.c2w[k]), j
    assert torch.equal(traj.keys[m + q + 1 :], inverse_keys(traj.keys[1 : m + 1].flip(0)))
    rgb, depth = render(scene, traj.c2w.float(), make_intrinsics(90.0, 32, 24), 24, 32)
    for j, k in zip(range(m + q, F), partner):
        assert torch.equal(rgb[j], rgb[k]) and torch.equal(depth[j], depth[k]), j
    assert not torch.equal(rgb[0], rgb[m])  # it did go somewhere


def test_revisit_with_odd_latent_count_pauses_at_the_turn():
    traj = plan_trajectory("revisit", Scene.random(8), 37, np.random.default_rng(2))  # 9 latents
    m, q = traj.info["turn_frame"], traj.info["pause_frames"]
    assert (m, q) == (16, 4)
    assert not traj.keys[m + 1 : m + q + 1].any()
    assert torch.equal(traj.c2w[-1], traj.c2w[0])


def _trajectories():
    cfg = TrajectoryConfig()
    for seed in range(6):
        scene = Scene.random(100 + seed)
        for kind in ("random", "revisit", "orbit"):
            yield scene, plan_trajectory(kind, scene, 65, np.random.default_rng(seed), cfg)


def test_camera_never_inside_objects_or_beyond_walls():
    cfg = TrajectoryConfig()
    kinds = set()
    for scene, traj in _trajectories():
        kinds.add(traj.kind)
        centres = traj.c2w[:, :3, 3]
        assert float(_sdf(scene, centres).min()) >= cfg.margin - 1e-9, traj.kind
        assert float(_room_sdf(scene, centres).min()) >= cfg.margin - 1e-9, traj.kind
        # Steps are far shorter than the clearance, so nothing is passed through between frames.
        assert float((centres[1:] - centres[:-1]).norm(dim=-1).max()) <= 0.02 * math.sqrt(2) + 1e-9
        R = traj.c2w[:, :3, :3]
        assert float(torch.rad2deg(torch.asin(R[:, 1, 2].abs())).max()) <= cfg.max_pitch_deg + 1e-6
        assert float(torch.rad2deg(torch.asin(R[:, 1, 0].abs())).max()) <= cfg.max_roll_deg + 1e-6
    assert kinds == {"random", "revisit", "orbit"}


def test_keys_are_exactly_the_applied_motion():
    cfg = TrajectoryConfig()
    steps = frame_steps(cfg)
    moving = turning = 0
    for _, traj in _trajectories():
        keys, c2w = traj.keys, traj.c2w
        assert keys.dtype == torch.bool and c2w.dtype == torch.float64
        assert not keys[0].any()
        # Integrating the keys reproduces the poses, and the poses imply the keys, per frame ...
        assert torch.allclose(keys_to_poses(keys, steps, c2w[0]), c2w, atol=1e-9)
        assert torch.equal(poses_to_keys(c2w), keys)
        # ... and per latent (stride 4: the granularity actions are held at).
        assert torch.equal(poses_to_keys(latent_poses(c2w, 4)), latent_keys_from_frames(keys, 4))
        moving += int(keys[:, :4].any(-1).sum())
        turning += int(keys[:, 4:].any(-1).sum())
    assert moving > 500 and turning > 500  # the walks really move and turn


def test_one_latent_of_a_key_is_worldplays_step():
    steps = frame_steps(TrajectoryConfig())
    w = torch.zeros(5, 8, dtype=torch.bool)
    w[1:, 0] = True
    assert torch.isclose(keys_to_poses(w, steps)[-1, 2, 3], torch.tensor(0.08, dtype=torch.float64))
    yaw = torch.zeros(5, 8, dtype=torch.bool)
    yaw[1:, 4] = True
    R = keys_to_poses(yaw, steps)[-1, :3, :3]
    assert math.isclose(math.degrees(math.atan2(float(R[0, 2]), float(R[2, 2]))), 3.0, rel_tol=1e-9)


def test_orbit_circles_a_point_looking_inward():
    for seed in range(3):
        traj = plan_trajectory("orbit", Scene.random(200 + seed), 129, np.random.default_rng(seed))
        assert traj.kind == "orbit"
        cx, cz = traj.info["orbit_centre_xz"]
        pos, fwd = traj.c2w[:, :3, 3], traj.c2w[:, :3, 2]
        to_c = torch.stack([cx - pos[:, 0], torch.zeros_like(pos[:, 0]), cz - pos[:, 2]], -1)
        dist = to_c.norm(dim=-1)
        assert float((dist / traj.info["orbit_radius"] - 1).abs().max()) < 0.02
        assert float(torch.rad2deg(torch.acos(((fwd * to_c).sum(-1) / dist).clamp(max=1))).max()) < 3.0
        assert traj.keys[1:, 2:4].any(-1).all()  # strafing all the way


def test_unknown_kind_and_bad_frame_count_raise():
    scene = Scene.random(0)
    with pytest.raises(ValueError, match="unknown trajectory kind"):
        make_trajectory("spiral", scene, 9, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1 \\+ 4"):
        make_trajectory("random", scene, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="segment_min_latents"):
        make_trajectory("random", scene, 9, np.random.default_rng(0), TrajectoryConfig(segment_min_latents=0))


def test_built_scene_rows_and_free_space():
    scene = Scene.build(4.0, 4.0, 3.0, [Sphere(1.0, 1.0, 0.3), Box(-1.0, 0.0, 0.5, 0.5, 1.0, 30.0), Cylinder(2.0, -2.0, 0.4, 3.0)])
    assert scene.kind.tolist() == [0, 1, 2]  # sorted by kind
    pts = torch.tensor([[-1.0, -1.4, 0.0], [1.0, -1.4, 1.0], [0.0, -1.4, -2.5], [3.9, -1.4, 0.0], [0.0, -1.4, 2.0]])
    assert scene.free(pts, 0.35).tolist() == [False, False, True, False, True]


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_shards_and_preview(tmp_path, capsys):
    from data.indexed import ShardDataset
    from data.synthetic.__main__ import main
    from data.video import read_mp4

    out = tmp_path / "ds"
    assert main(["--out", str(out), "--clips", "3", "--frames", "9", "--size", "24", "--scenes", "2", "--seed", "5"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synthetic: 3 clips x 9 frames at 24x24") and "frames/s" in line
    ds = ShardDataset(out)
    assert len(ds) == 3
    clips = [ds[i] for i in range(3)]
    for i, clip in enumerate(clips):
        assert clip["video"].shape == (9, 24, 24, 3) and clip["depth"].shape == (9, 24, 24)
        assert clip["meta"]["source"] == "synthetic" and clip["meta"]["clip_index"] == i
        assert clip["meta"]["trajectory"] in ("random", "revisit", "orbit")
    assert clips[0]["meta"]["scene_seed"] == clips[2]["meta"]["scene_seed"] != clips[1]["meta"]["scene_seed"]
    direct = make_clip(clips[1]["meta"]["clip_seed"], SyntheticConfig(num_frames=9, height=24, width=24),
                       scene=Scene.random(clips[1]["meta"]["scene_seed"]))
    assert np.array_equal(direct["video"], clips[1]["video"])  # any clip regenerates alone (lossless shards)
    assert read_mp4(out / "preview.mp4").shape == (27, 24, 24, 3)
    assert (out / "preview.png").stat().st_size > 0 and (out / "generation.json").exists()
    with pytest.raises(SystemExit, match="frames"):
        main(["--out", str(tmp_path / "bad"), "--clips", "1", "--frames", "10"])


def test_worker_processes_generate_the_same_clips():
    from data.synthetic import dataset_clip, iter_dataset_clips

    cfg = SyntheticConfig(num_frames=5, height=16, width=16)
    spawned = list(iter_dataset_clips(3, 2, 9, cfg, workers=2, batch=2))  # a batch of 2, then a batch of 1
    assert [c["meta"]["clip_index"] for c in spawned] == [0, 1, 2]
    for i, clip in enumerate(spawned):
        direct = dataset_clip(i, 2, 9, cfg)
        assert np.array_equal(clip["video"], direct["video"]) and np.array_equal(clip["c2w"], direct["c2w"])
        assert clip["meta"] == direct["meta"]


# ------------------------------------------------------------------------------------------------
# Batched rendering


def test_batched_render_equals_each_clip_rendered_alone():
    from dataclasses import replace

    from data.synthetic import render_batch

    scenes = [Scene.random(i) for i in range(4)]  # open-sky and roofed rooms
    assert len({s.sky for s in scenes}) == 2
    scenes[2] = replace(scenes[2], fog_density=0.0)  # fogged and fog-free scenes shaded together
    scenes.append(Scene.build(4.0, 4.0, 3.0, [], seed=3))  # no objects at all
    poses = [make_trajectory("mixed", s, 5, np.random.default_rng(i))[1].float() for i, s in enumerate(scenes)]
    sid = torch.repeat_interleave(torch.arange(len(scenes)), 5)
    for H, W, ss in ((16, 20, 1), (9, 11, 2)):  # 9x11x4 rays: not a multiple of the SIMD padding
        K = make_intrinsics(90.0, W, H)
        alone = [render(s, c, K, H, W, supersample=ss) for s, c in zip(scenes, poses)]
        for rays in (None, 400):  # default blocks, and blocks that cut across clips
            rgb, depth = render_batch(scenes, torch.cat(poses), K, H, W, scene_index=sid, supersample=ss,
                                      trace_rays=rays, shade_rays=rays and 3 * rays)
            for i, (a_rgb, a_depth) in enumerate(alone):
                assert torch.equal(rgb[5 * i : 5 * i + 5], a_rgb), (H, W, rays, i)
                assert torch.equal(depth[5 * i : 5 * i + 5], a_depth), (H, W, rays, i)
    with pytest.raises(ValueError, match="scene_index"):
        render_batch(scenes, torch.cat(poses), K, H, W, scene_index=sid[:-1])
    with pytest.raises(ValueError, match="scene_index"):
        render_batch(scenes[:2], torch.cat(poses), K, H, W, scene_index=sid)


def test_dataset_clips_do_not_depend_on_batch_or_workers():
    from data.synthetic import dataset_clip, iter_dataset_clips
    from data.synthetic.dataset import _stream, plan_dataset_clip

    cfg = SyntheticConfig(num_frames=5, height=16, width=16, supersample=2)
    direct = [dataset_clip(i, 3, 9, cfg) for i in range(5)]
    runs = {
        "batch 2": list(iter_dataset_clips(5, 3, 9, cfg, batch=2)),
        "batch 5": list(iter_dataset_clips(5, 3, 9, cfg, batch=5, depth=False)),
        # the device path (planning apart, batches in flight), here on the CPU
        "stream": list(_stream((plan_dataset_clip(i, 3, 9, cfg) for i in range(5)), cfg, torch.device("cpu"), True, 2)),
    }
    for name, clips in runs.items():
        assert [c["meta"]["clip_index"] for c in clips] == list(range(5)), name
        for clip, ref in zip(clips, direct):
            assert np.array_equal(clip["video"], ref["video"]) and np.array_equal(clip["c2w"], ref["c2w"]), name
            assert np.array_equal(clip["keys"], ref["keys"]) and clip["meta"] == ref["meta"], name
            assert ("depth" in clip) == (name != "batch 5"), name
            if "depth" in clip:
                assert np.array_equal(clip["depth"], ref["depth"]), name
    with pytest.raises(ValueError, match="batch"):
        next(iter_dataset_clips(2, 1, 0, cfg, batch=0))
