"""models/warp.py: the conditioning image turned into each latent's camera (rotation-only homography)."""

from __future__ import annotations

import pytest
import torch

from data.geometry import invert_rigid, make_pose, rotation_y
from models.autoencoders.patch import PatchAutoencoder
from models.warp import check_image_warp, warp_into_cameras

K = torch.tensor([[0.8, 0.0, 0.5], [0.0, 0.8, 0.5], [0.0, 0.0, 1.0]])


def _w2c(yaws_deg: list[float]) -> torch.Tensor:
    """[1, T, 4, 4] cameras at the origin yawed by each angle (positive: the view turns right)."""
    c2w = torch.stack([make_pose(rotation_y(float(a)),
                                 torch.zeros(3, dtype=torch.float64)) for a in yaws_deg])
    return invert_rigid(c2w).float()[None]


def _stripe_image(size: int = 32) -> torch.Tensor:
    """uint8-like video [1, 3, 1, H, W] in [-1, 1]: black with a white vertical stripe at columns 15-16."""
    img = -torch.ones(1, 3, 1, size, size)
    img[..., 15:17] = 1.0
    return img


@pytest.mark.parametrize("mode", ["patch", "latent"])
def test_identity_camera_returns_the_image(mode: str) -> None:
    ae = PatchAutoencoder(4)
    lat = ae.encode(torch.rand(2, 3, 1, 16, 16) * 2 - 1)[:, :, 0]
    views = warp_into_cameras(lat, _w2c([0.0, 0.0]).expand(2, -1, -1, -1), K.expand(2, 2, 3, 3), mode)
    assert views.shape == (2, 48, 2, 4, 4)
    assert torch.allclose(views[:, :, 0], lat, atol=1e-5) and torch.allclose(views[:, :, 1], lat, atol=1e-5)


def test_a_yaw_to_the_right_moves_the_scene_left_and_a_half_turn_sees_nothing() -> None:
    ae = PatchAutoencoder(4)
    lat = ae.encode(_stripe_image())[:, :, 0]
    views = warp_into_cameras(lat, _w2c([0.0, 10.0, 180.0]), K.expand(1, 3, 3, 3), "patch")
    frames = ae.decode(views)[0, 0]  # red channel [T, H, W]
    cols = frames.mean(dim=1)  # [T, W] column profile
    centre = lambda row: float(torch.arange(32.0)[row > 0.5].mean())  # noqa: E731  (the white stripe's columns)
    assert abs(centre(cols[0]) - 15.5) < 0.1
    # 10 degrees at fx = 0.8 W: tan(10°)·0.8·32 ≈ 4.5 px to the left
    assert 3.5 < centre(cols[0]) - centre(cols[1]) < 5.5
    assert frames[2].abs().max() == 0  # behind the image's camera: zero (the autoencoder's mean)


def test_bad_modes_are_named() -> None:
    assert check_image_warp("patch", 48) == "patch"
    with pytest.raises(ValueError, match="model.image_warp"):
        check_image_warp("warp", 48)
    with pytest.raises(ValueError, match="3·p² channels"):
        check_image_warp("patch", 16)


def test_the_model_conditions_every_latent_on_its_view_of_the_image() -> None:
    from dataclasses import replace

    from model_helpers import randomize
    from models.config import preset
    from models.dit import WorldDiT

    cfg = replace(preset("tiny"), latent_channels=48, text_dim=0)
    plain = randomize(WorldDiT(cfg), 0).eval()
    warped = WorldDiT(replace(cfg, image_warp="patch")).eval()
    warped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 48, 4, 4, 4)
    lat = PatchAutoencoder(4).encode(_stripe_image(16))[:, :, 0]
    kw = dict(actions=torch.zeros(1, 4, dtype=torch.long), image_latent=lat, cond_mask=torch.tensor([[True, False, False, False]]),
              K=K.expand(1, 4, 3, 3), chunk_size=4)
    sigma = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    with torch.no_grad():
        a = warped(x, sigma, w2c=_w2c([0.0, 5.0, 10.0, 15.0]), **kw)
        b = warped(x, sigma, w2c=_w2c([0.0, -5.0, -10.0, -15.0]), **kw)
        c = plain(x, sigma, w2c=_w2c([0.0, 5.0, 10.0, 15.0]), **kw)
    assert not torch.allclose(a, b, atol=1e-4)  # the cameras reach the input through the image's views
    assert not torch.allclose(a, c, atol=1e-4)  # and the views differ from the image at its slot only
    with pytest.raises(ValueError, match="image_warp"):
        WorldDiT(replace(cfg, latent_channels=16, image_warp="patch"))
