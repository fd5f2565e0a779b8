"""Camera/action geometry: the 81-class table, pose<->keys round trips, pose formats, intrinsics."""

import json
import math

import pytest
import torch

from data.actions import (
    MotionSteps,
    action_id_to_keys,
    keys_to_action_id,
    keys_to_motion,
    keys_to_poses,
    poses_to_keys,
)
from data.geometry import (
    crop_intrinsics,
    euler_xyz_degrees,
    invert_rigid,
    is_rigid,
    make_intrinsics,
    make_pose,
    normalize_intrinsics,
    project,
    rebase_to_first,
    relative_pose,
    resize_intrinsics,
    rotation_x,
    rotation_y,
)
from data.latents import (
    latent_action_ids,
    latent_frame_index,
    latent_groups,
    latent_keys_from_frames,
    latent_poses,
    num_latents,
)
from data.poseio import parse_pose_string, pose_string_to_poses, read_pose_json, write_pose_json


def keys(*names: str) -> torch.Tensor:
    order = ["W", "S", "D", "A", "yaw_right", "yaw_left", "pitch_up", "pitch_down"]
    k = torch.zeros(8, dtype=torch.bool)
    for n in names:
        k[order.index(n)] = True
    return k


# WorldPlay §3.1: translation 1 W, 2 S, 3 D, 4 A, 5 W+D, 6 W+A, 7 S+D, 8 S+A;
# rotation 1 yaw-R, 2 yaw-L, 3 up, 4 down, 5 R+up, 6 R+down, 7 L+up, 8 L+down.
TRANS = [(), ("W",), ("S",), ("D",), ("A",), ("W", "D"), ("W", "A"), ("S", "D"), ("S", "A")]
ROT = [
    (),
    ("yaw_right",),
    ("yaw_left",),
    ("pitch_up",),
    ("pitch_down",),
    ("yaw_right", "pitch_up"),
    ("yaw_right", "pitch_down"),
    ("yaw_left", "pitch_up"),
    ("yaw_left", "pitch_down"),
]


def test_action_table_is_worldplays():
    for ti, t in enumerate(TRANS):
        for ri, r in enumerate(ROT):
            k = keys(*t, *r)
            assert int(keys_to_action_id(k)) == 9 * ti + ri
            assert torch.equal(action_id_to_keys(torch.tensor(9 * ti + ri)), k)
    all_ids = torch.arange(81)
    assert torch.equal(keys_to_action_id(action_id_to_keys(all_ids)), all_ids)


def test_opposing_keys_cancel():
    assert int(keys_to_action_id(keys("W", "S"))) == 0
    assert int(keys_to_action_id(keys("W", "S", "D"))) == 9 * 3
    assert int(keys_to_action_id(keys("yaw_right", "yaw_left", "pitch_up"))) == 3


def test_action_id_range_is_checked():
    with pytest.raises(ValueError, match="action ids"):
        action_id_to_keys(torch.tensor([81]))


def test_rotations_follow_opencv_convention():
    fwd = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    right = rotation_y(10.0) @ fwd
    assert right[0] > 0  # yaw right turns the view towards +x
    up = rotation_x(10.0) @ fwd
    assert up[1] < 0  # pitch up turns the view towards -y (y points down)
    R = rotation_y(7.0) @ rotation_x(-4.0)
    assert torch.allclose(euler_xyz_degrees(R), torch.tensor([-4.0, 7.0, 0.0], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("t,r", [(t, r) for t in TRANS for r in ROT])
def test_keys_pose_keys_round_trip(t, r):
    held = keys(*t, *r)
    seq = torch.stack([torch.zeros(8, dtype=torch.bool), held, held, held])
    poses = keys_to_poses(seq, MotionSteps(0.08, 3.0))
    assert torch.equal(poses_to_keys(poses), seq)


def test_pose_keys_pose_round_trip_on_canonical_moves():
    seq = parse_pose_string("w-3, right-2, d-2, s+left-2, up-1, a+down-2")
    poses = keys_to_poses(seq)
    again = keys_to_poses(poses_to_keys(poses))
    assert torch.allclose(poses, again, atol=1e-12)


def test_keys_to_motion_values():
    m = keys_to_motion(keys("W", "yaw_right"), MotionSteps(0.5, 90.0))
    assert torch.allclose(m[:3, 3], torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64))
    assert torch.allclose(m[:3, :3] @ torch.tensor([0.0, 0, 1], dtype=torch.float64), torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)


def test_pose_string_parses_to_expected_poses():
    k, P = pose_string_to_poses("w-3, right-1, d-4")
    assert k.shape == (9, 8) and P.shape == (9, 4, 4)
    assert torch.equal(P[0], torch.eye(4, dtype=torch.float64))
    assert torch.allclose(P[3, :3, 3], torch.tensor([0, 0, 0.24], dtype=torch.float64))
    # one yaw-right of 3 deg at latent 4, then 4 steps right along the rotated x axis
    R = rotation_y(3.0)
    assert torch.allclose(P[4, :3, :3], R, atol=1e-12)
    expect = torch.tensor([0, 0, 0.24], dtype=torch.float64) + R @ torch.tensor([0.32, 0, 0], dtype=torch.float64)
    assert torch.allclose(P[8, :3, 3], expect, atol=1e-12)
    assert keys_to_action_id(k).tolist() == [0, 9, 9, 9, 1, 27, 27, 27, 27]
    # combined moves with '+'
    assert keys_to_action_id(parse_pose_string("w+left-2")).tolist() == [0, 11, 11]
    with pytest.raises(ValueError, match="unknown move"):
        parse_pose_string("jump-2")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_pose_string("w3")


def test_worldplay_pose_json(tmp_path):
    K = [[969.697, 0, 960], [0, 969.697, 540], [0, 0, 1]]
    raw = {
        "0": {"extrinsic": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "K": K},
        "1": {"extrinsic": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0.08], [0, 0, 0, 1]], "K": K},
    }
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(raw))
    c2w, Ks = read_pose_json(path)
    assert c2w.shape == (2, 4, 4) and Ks.shape == (2, 3, 3)
    assert float(c2w[1, 2, 3]) == pytest.approx(0.08)
    assert latent_action_ids(c2w).tolist() == [0, 9]  # forward
    out = tmp_path / "out.json"
    write_pose_json(out, c2w, Ks)
    c2w2, K2 = read_pose_json(out)
    assert torch.equal(c2w, c2w2) and torch.equal(Ks, K2)
    raw["1"]["extrinsic"][0][0] = 2.0
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="entry '1' key 'extrinsic' is not a rigid"):
        read_pose_json(path)
    del raw["1"]["K"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="lacks key 'K'"):
        read_pose_json(path)


def test_rigid_helpers():
    g = torch.Generator().manual_seed(0)
    R = rotation_y(torch.rand(5, generator=g, dtype=torch.float64) * 90) @ rotation_x(torch.rand(5, generator=g, dtype=torch.float64) * 30)
    T = make_pose(R, torch.randn(5, 3, generator=g, dtype=torch.float64))
    assert torch.allclose(invert_rigid(T) @ T, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-12)
    assert is_rigid(T).all()
    bad = T.clone()
    bad[0, 0, 0] = 3
    assert not bool(is_rigid(bad)[0]) and bool(is_rigid(bad)[1])
    rb = rebase_to_first(T)
    assert torch.allclose(rb[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(relative_pose(rb[1], rb[3]), relative_pose(T[1], T[3]), atol=1e-12)


def test_intrinsics_resize_crop_keep_relative_place():
    K = make_intrinsics(70.0, 160, 120).double()
    w2c = invert_rigid(make_pose(rotation_y(5.0), torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64)))
    pts = torch.tensor([[0.3, -0.2, 4.0], [-1.0, 0.5, 6.0]], dtype=torch.float64)
    uv, depth = project(K, w2c, pts)
    assert (depth > 0).all()
    # resize 160x120 -> 80x60: the point stays at the same fraction of the image
    K2 = resize_intrinsics(K, (120, 160), (60, 80))
    uv2, _ = project(K2, w2c, pts)
    assert torch.allclose(uv2 / torch.tensor([80.0, 60.0], dtype=torch.float64), uv / torch.tensor([160.0, 120.0], dtype=torch.float64), atol=1e-12)
    # crop rows 10.. and cols 20..: the point moves by exactly the crop offset
    K3 = crop_intrinsics(K, top=10, left=20)
    uv3, _ = project(K3, w2c, pts)
    assert torch.allclose(uv3, uv - torch.tensor([20.0, 10.0], dtype=torch.float64), atol=1e-12)
    # normalised intrinsics do not depend on resolution
    assert torch.allclose(normalize_intrinsics(K, 160, 120), normalize_intrinsics(K2, 80, 60), atol=1e-12)


def test_latent_grouping():
    assert num_latents(1, 4) == 1 and num_latents(65, 4) == 17
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        num_latents(64, 4)
    assert latent_frame_index(9, 4).tolist() == [0, 4, 8]
    assert [list(g) for g in latent_groups(9, 4)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    frame_keys = parse_pose_string("w-8")  # 9 frames of W
    frame_poses = keys_to_poses(frame_keys, MotionSteps(0.02, 0.75))
    lp = latent_poses(frame_poses, 4)
    assert torch.equal(lp, frame_poses[[0, 4, 8]])
    assert latent_action_ids(lp).tolist() == [0, 9, 9]
    assert keys_to_action_id(latent_keys_from_frames(frame_keys, 4)).tolist() == [0, 9, 9]
    assert math.isclose(float(lp[2, 2, 3]), 0.16, abs_tol=1e-12)
