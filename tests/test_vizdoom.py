"""ViZDoom source: headless rendering, Doom -> OpenCV poses, intrinsics checked against pixels,
keys vs poses, the stuck guard, revisits, and shards written by the CLI."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("vizdoom")
cv2 = pytest.importorskip("cv2")

from data.actions import MotionThresholds  # noqa: E402
from data.contract import validate_clip  # noqa: E402
from data.geometry import camera_center, camera_forward, is_rigid, relative_pose, rotation_y  # noqa: E402
from data.vizdoom.agents import RevisitAgent, ScriptedAgent, StuckGuard, StuckGuardConfig, keys_of  # noqa: E402
from data.vizdoom.env import DoomConfig, DoomEnv, DoomState, doom_c2w, doom_intrinsics, plan_frames, terminal_speed  # noqa: E402
from data.vizdoom.record import ClipRejected, RecordConfig, key_agreement, pose_key_thresholds, record_clip, rollout  # noqa: E402

W, S, D, A = (keys_of(c, 0) for c in (1, 2, 3, 4))
YAW_R, YAW_L, NONE = keys_of(0, 1), keys_of(0, 2), keys_of(0, 0)


@pytest.fixture(scope="module")
def env():
    """A fast engine (5 deg yaw and ~3.3 map units of walking per tic) at the map-units scale."""
    with DoomEnv(DoomConfig(width=64, height=48, move_speed=10, turn_speed_deg=5.0, map_units_per_unit=1.0)) as e:
        yield e


def _poses(states: list[DoomState]) -> torch.Tensor:
    return doom_c2w(np.stack([s.position for s in states]), np.array([s.angle_deg for s in states]), 1.0)


def _walk(env: DoomEnv, keys: np.ndarray, n: int, start: str = "MAP01") -> list[DoomState]:
    states = [env.reset(start, seed=1)]
    for _ in range(n):
        states.append(env.step(keys))
    return states


def test_doom_c2w_axes():
    # Facing east (angle 0): forward +x, right -y (south), down -z; facing north: forward +y, right +x.
    T = doom_c2w(np.array([[64.0, 128.0, 41.0], [0.0, 0.0, 0.0]]), np.array([0.0, 90.0]), 64.0)
    assert bool(is_rigid(T).all())
    torch.testing.assert_close(T[0, :3, :3], torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64))
    torch.testing.assert_close(T[1, :3, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(T[1, :3, 2], torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(T[0, :3, 3], torch.tensor([1.0, 2.0, 41 / 64], dtype=torch.float64))


def test_intrinsics_and_frame_plans():
    K = doom_intrinsics(320, 240)
    assert (K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()) == pytest.approx((160, 192, 160, 120))
    assert doom_intrinsics(320, 200)[0, 0].item() == pytest.approx(400 / 3)  # Hor+: fx = 2H/3 at every aspect
    plan = plan_frames(128, 128)  # square output: a centred crop of a wider native render, then a resize
    rw, rh = plan.render_wh
    top, left, h, w = plan.crop
    assert h == w and w >= 128 and (top, left) == ((rh - h) // 2, (rw - w) // 2)
    assert plan.K[0, 2].item() == pytest.approx(64) and plan.K[1, 2].item() == pytest.approx(64)
    assert plan.K[1, 1] / plan.K[0, 0] == pytest.approx(1.2)
    sq = plan_frames(128, 96, square_pixels=True)
    assert sq.K[1, 1].item() == pytest.approx(sq.K[0, 0].item(), rel=0.01)
    with pytest.raises(ValueError, match="too small"):
        plan_frames(4, 4)


def test_short_clip_renders_headless(env):
    states = _walk(env, W, 6)
    rgb = np.stack([s.rgb for s in states])
    assert rgb.dtype == np.uint8 and rgb.shape == (7, *env.plan.render_wh[::-1], 3)
    assert rgb.std() > 5 and np.abs(np.diff(rgb.astype(np.int16), axis=0)).mean() > 0.5  # textured and moving
    assert env.plan.apply(states[0].rgb).shape == (48, 64, 3)
    with pytest.raises(ValueError, match="pitch"):
        env.keys_to_buttons(np.array([0, 0, 0, 0, 0, 0, 1, 0], bool))


@pytest.mark.parametrize("monsters", [False, True])
def test_monsters_only_when_asked(monsters, tmp_path, monkeypatch):
    with DoomEnv(DoomConfig(width=64, height=48, monsters=monsters)) as e:
        e.game.close()  # re-initialise with the object list on (the engine writes into its cwd)
        e.game.set_objects_info_enabled(True)
        monkeypatch.chdir(tmp_path)
        e.game.init()
        e.reset("MAP01", seed=0)
        names = {o.name for o in e.game.get_state().objects}
    assert "DoomPlayer" in names
    assert bool(names & {"Zombieman", "ShotgunGuy", "DoomImp"}) == monsters, names


def test_forward_and_strafe_move_along_camera_axes(env):
    for keys, axis in ((W, 2), (D, 0)):
        c2w = _poses(_walk(env, keys, 8))
        step = camera_center(c2w[-1]) - camera_center(c2w[0])
        assert step.norm() > 20  # map units
        cos = torch.dot(step / step.norm(), c2w[0, :3, axis])
        assert cos > 0.995, f"keys {keys.nonzero()[0]} moved along {step}, not camera axis {axis}"
        assert camera_center(c2w)[:, 2].std() < 1e-6  # flat floor, no view bob


def test_yaw_right_rotates_like_rotation_y(env):
    states = _walk(env, YAW_R, 4)
    c2w = _poses(states)
    turned = (states[0].angle_deg - states[-1].angle_deg) % 360.0  # Doom's angle decreases when turning right
    assert turned == pytest.approx(4 * env.cfg.tics_per_frame * env.cfg.turn_speed_deg, abs=0.05)
    rel = relative_pose(c2w[0], c2w[-1])[:3, :3]
    torch.testing.assert_close(rel, rotation_y(turned), atol=1e-9, rtol=0)
    expected_forward = c2w[0, :3, :3] @ rotation_y(turned)[:, 2]
    torch.testing.assert_close(camera_forward(c2w[-1]), expected_forward, atol=1e-9, rtol=0)
    assert torch.dot(camera_forward(c2w[-1]), c2w[0, :3, 0]) > 0  # the view swung towards the old right


def _warp_error(src: np.ndarray, dst: np.ndarray, K: np.ndarray, rel: np.ndarray, plane_h: float | None, row0: int = 0) -> float:
    """Mean |dst - src warped into dst| over dst pixels (rows >= row0) for the pose of dst in src's frame.

    plane_h None: pure rotation (any depth); else pixels lie on a floor plane plane_h below the camera.
    """
    H, W = dst.shape[:2]
    ys, xs = np.mgrid[row0:H, 0:W].astype(np.float64) + 0.5
    rays = np.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], np.ones_like(xs)], -1)
    pts = rays if plane_h is None else rays * (plane_h / rays[..., 1:2])
    p = pts @ rel[:3, :3].T + (0.0 if plane_h is None else rel[:3, 3])
    u = (K[0, 0] * p[..., 0] / p[..., 2] + K[0, 2] - 0.5).astype(np.float32)
    v = (K[1, 1] * p[..., 1] / p[..., 2] + K[1, 2] - 0.5).astype(np.float32)
    ok = (u > 1) & (u < W - 2) & (v > 1) & (v < H - 2) & (p[..., 2] > 0)
    warped = cv2.remap(src.astype(np.float32), u, v, cv2.INTER_LINEAR)
    return float(np.abs(warped - dst[row0:].astype(np.float32)).mean(-1)[ok].mean())


def test_rendered_pixels_match_intrinsics_and_poses():
    """Warp one rendered frame into the next with our K and relative pose: the true model must beat
    a wrong focal length (+-15%) and the opposite yaw sign; the same with a floor plane for a step forward."""
    with DoomEnv(DoomConfig(width=160, height=120, move_speed=10, turn_speed_deg=2.5, map_units_per_unit=1.0)) as e:
        K = doom_intrinsics(160, 120).numpy()
        assert e.plan.render_wh == (160, 120)
        err = {"model": 0.0, "fx-15%": 0.0, "fx+15%": 0.0, "flipped": 0.0}
        s = e.reset("MAP01", seed=1)
        for _ in range(4):  # four headings
            for _ in range(8):
                s = e.step(YAW_R)
            s0, s1 = s, e.step(YAW_R)
            s1 = e.step(YAW_R)
            rel = relative_pose(_poses([s0])[0], _poses([s1])[0]).numpy()
            for name, (scale, R) in {"model": (1.0, rel), "fx-15%": (0.85, rel), "fx+15%": (1.15, rel), "flipped": (1.0, rel.T)}.items():
                err[name] += _warp_error(s0.rgb, s1.rgb, np.diag([scale, 1, 1]) @ K, R, None)
        assert err["model"] < 0.8 * min(err["fx-15%"], err["fx+15%"]) and err["model"] < 0.5 * err["flipped"], err

        s0 = e.reset("MAP01", seed=1)  # MAP01 start: flat floor ahead, eye 41 map units above it
        for _ in range(3):
            s1 = e.step(W)
        rel = relative_pose(_poses([s0])[0], _poses([s1])[0]).numpy()
        eye = s0.position[2] - 0.0
        floor = {sc: _warp_error(s0.rgb, s1.rgb, np.diag([1, sc, 1]) @ K, rel, eye, row0=84) for sc in (0.85, 1.0, 1.15)}
        assert floor[1.0] < 0.9 * min(floor[0.85], floor[1.15]), floor


def test_keys_from_poses_agree_with_pressed_keys():
    cfg = DoomConfig(width=64, height=48)
    thr = pose_key_thresholds(cfg)
    assert isinstance(thr, MotionThresholds) and 0 < thr.translation < 0.2
    with DoomEnv(cfg) as e:
        # Scripted: 8 latents of W, 8 of yaw-right, 8 of W+A: only the latents right after a change may lag.
        script = np.concatenate([np.tile(k, (32, 1)) for k in (W, YAW_R, keys_of(6, 0))])
        states, keys = rollout(e, ScriptedAgent(script), 97, e.reset("MAP01", seed=1))
        c2w = doom_c2w(np.stack([s.position for s in states]), np.array([s.angle_deg for s in states]), cfg.map_units_per_unit)
        scripted = key_agreement({"keys": keys, "c2w": c2w}, 4, thr)
        assert scripted["action"] >= 0.85 and scripted["steady"] >= 0.95, scripted
        # The random and revisit agents: most latents agree.
        stats = [key_agreement(record_clip(e, RecordConfig(num_frames=65, trajectory=k), seed), 4, thr) for k, seed in
                 (("random", 3), ("revisit", 4), ("random", 5))]
    assert np.mean([s["action"] for s in stats]) >= 0.6, stats
    assert np.mean([s["rotation"] for s in stats]) >= 0.85, stats


def test_stuck_guard_turns_away_from_a_wall(env):
    # MAP01: turn to face north (18 x 5 deg), then hold W into the wall ~200 map units ahead.
    script = np.concatenate([np.tile(YAW_L, (9, 1)), np.tile(W, (200, 1))])
    step = terminal_speed(env.cfg.move_speed) * env.cfg.tics_per_frame
    states, keys = rollout(env, ScriptedAgent(script), 120, env.reset("MAP01", seed=1))
    ys = np.array([s.position[1] for s in states])
    assert np.ptp(ys[-30:]) < 0.5 and keys[-30:, 0].all()  # without the guard: stuck, still pressing W
    guard = StuckGuard(ScriptedAgent(script), step, StuckGuardConfig(window=8, escape_frames=(12, 12)))
    guard.reset(np.random.default_rng(0))
    states, keys = rollout(env, guard, 120, env.reset("MAP01", seed=1))
    assert guard.escapes >= 1
    turned = np.flatnonzero(keys[10:, 4] | keys[10:, 5]) + 10
    assert len(turned) >= 12 and not keys[turned, :4].any()  # pure turns after the approach
    first = turned[0]
    assert abs(states[first + 12].angle_deg - states[first].angle_deg) >= 50  # 12 frames of 10 deg, modulo a wrap
    assert ys[first - 1] > ys[30]  # it had walked north into the wall before turning


def test_revisit_returns_near_its_start():
    cfg = DoomConfig(width=64, height=48)
    with DoomEnv(cfg) as e:
        # A scripted outbound leg (48 frames across MAP01's open start room), then the return controller.
        script = np.concatenate([np.tile(k, (n, 1)) for k, n in ((W, 12), (YAW_R, 8), (keys_of(6, 0), 16), (keys_of(1, 2), 12))])
        agent = RevisitAgent(ScriptedAgent(script), 97, cfg.tics_per_frame, cfg.turn_speed_deg * cfg.tics_per_frame)
        agent.reset(np.random.default_rng(0))
        states, keys = rollout(e, agent, 97, e.reset("MAP01", seed=1))
        assert agent.return_frame == 48
        pos = np.stack([s.position for s in states])
        yaw = np.array([s.angle_deg for s in states])
        far = np.linalg.norm(pos - pos[0], axis=1)
        assert far[48] > 80  # map units away at the turning point
        assert far[-1] < 8 and abs((yaw[-1] - yaw[0] + 180) % 360 - 180) < 2
        # On the way back it passes the outbound poses in reverse: frame 48 + n near frame 48 - n.
        mirror = np.linalg.norm(pos[48:] - pos[48::-1], axis=1)
        assert np.median(mirror) < 12 and mirror.max() < 40, mirror.round(1)
        assert keys[49:, 1].sum() > 20  # it walks backwards (S), facing the way it came
        # The explorer-driven version records its return statistics in meta.
        clip = record_clip(e, RecordConfig(num_frames=65, trajectory="revisit"), seed=11)
    r = clip["meta"]["revisit"]
    assert r["return_frame"] == 32 and r["end_distance_map_units"] < 12, r


class _TeleportEnv:
    """Duck-typed engine whose player jumps 500 map units on the third frame."""

    def __init__(self):
        self.cfg, self.i = DoomConfig(), 0

    def step(self, keys):
        self.i += 1
        x = 500.0 if self.i >= 3 else float(self.i)
        return DoomState(np.zeros((4, 4, 3), np.uint8), None, np.array([x, 0.0, 41.0]), 0.0, 0.0, self.i)


def test_teleport_is_rejected():
    start = DoomState(np.zeros((4, 4, 3), np.uint8), None, np.array([0.0, 0.0, 41.0]), 0.0, 0.0, 0)
    with pytest.raises(ClipRejected, match="frame 3: camera jumped"):
        rollout(_TeleportEnv(), ScriptedAgent(W[None]), 6, start)


def test_cli_writes_shards_that_read_back(tmp_path):
    from data.shards import iter_clips, read_index
    from data.vizdoom.__main__ import main

    out = tmp_path / "doom"
    summary = main(["--out", str(out), "--clips", "2", "--frames", "17", "--size", "64x48", "--seed", "3", "--preview", "1"])
    index = read_index(out)
    assert index.num_samples == 2 and summary["frames"] == 34 and summary["frames_per_second"] > 0
    clips = list(iter_clips(out))
    assert len(clips) == 2
    for clip in clips:
        validate_clip(clip, clip["__key__"])
        assert clip["video"].shape == (17, 48, 64, 3) and clip["meta"]["source"] == "vizdoom"
        np.testing.assert_allclose(np.asarray(clip["c2w"])[0], np.eye(4), atol=1e-6)  # rebased to frame 0
        np.testing.assert_allclose(np.asarray(clip["K"])[0], plan_frames(64, 48).K.numpy(), rtol=1e-5)
    assert (out / "preview" / "clip0000.mp4").is_file() and (out / "preview" / "clip0000.png").is_file()
    stats = json.loads((out / "vizdoom_stats.json").read_text())
    assert set(stats["agreement_per_latent_stride4"]) >= {"action", "translation", "rotation"}
