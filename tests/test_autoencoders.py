"""Autoencoders: patch round trip and causal grouping; diffusers VAEs through tiny random configs."""

from __future__ import annotations

import pytest
import torch

from data.latents import latent_groups
from models.autoencoders import (
    AUTOENCODERS,
    AutoencoderConfig,
    HunyuanVideo15VAE,
    PatchAutoencoder,
    WanVAE,
    build_autoencoder,
)


def _video(F: int, H: int = 8, W: int = 12, B: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, F, H, W, generator=g) * 2 - 1


# ---------------------------------------------------------------- patch autoencoder


@pytest.mark.parametrize("p,s", [(1, 1), (2, 1), (2, 4), (4, 2)])
def test_patch_round_trip_is_exact(p: int, s: int) -> None:
    ae = PatchAutoencoder(p, s)
    F = 1 + 3 * s
    video = _video(F)
    z = ae.encode(video)
    assert z.shape == (2, 3 * s * p * p, 4, 8 // p, 12 // p)
    assert z.shape[1:] == ae.latent_shape(F, 8, 12)
    assert torch.equal(ae.decode(z), video)


def test_patch_grouping_follows_data_latents() -> None:
    """Changing one frame changes exactly the latent whose group holds it."""
    ae = PatchAutoencoder(2, 4)
    F = 13
    video = _video(F, B=1)
    z = ae.encode(video)
    for t, group in enumerate(latent_groups(F, 4)):
        for f in group:
            v2 = video.clone()
            v2[:, :, f] += 0.5
            changed = (ae.encode(v2) - z).abs().amax(dim=(0, 1, 3, 4)) > 0
            assert changed.nonzero().flatten().tolist() == [t]


def test_patch_first_latent_replicates_frame0_and_decode_averages() -> None:
    ae = PatchAutoencoder(2, 4)
    z = ae.encode(_video(5, B=1))
    per_frame = z[:, :, 0].reshape(1, 3, 4, 4, 4, 6)  # (rgb, frame-in-group, patch, h, w)
    assert torch.equal(per_frame, per_frame[:, :, :1].expand_as(per_frame))
    # A latent whose replicas disagree (as a generated one may) decodes frame 0 to their mean.
    z_gen = torch.randn_like(z)
    frame0 = ae.decode(z_gen)[:, :, 0]
    replicas = z_gen[:, :, 0].reshape(1, 3, 4, 2, 2, 4, 6)  # (rgb, st, ph, pw, h, w)
    expected = replicas.mean(2).permute(0, 1, 4, 2, 5, 3).reshape(1, 3, 8, 12)
    torch.testing.assert_close(frame0, expected)


def test_patch_normalisation_gives_unit_variance_and_round_trips() -> None:
    video = _video(5, B=4) * 0.3 + torch.tensor([0.2, -0.1, 0.4]).view(1, 3, 1, 1, 1)
    mean = video.mean(dim=(0, 2, 3, 4)).tolist()
    std = video.std(dim=(0, 2, 3, 4)).tolist()
    ae = PatchAutoencoder(2, 2, mean=mean, std=std)
    z = ae.encode(video)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    assert per_channel.mean(1).abs().max() < 0.15
    assert (per_channel.std(1) - 1).abs().max() < 0.15
    torch.testing.assert_close(ae.decode(z), video, atol=1e-6, rtol=1e-6)
    # 3 RGB values equal the same statistics spelt out per latent channel.
    per_latent = PatchAutoencoder(2, 2, mean=torch.tensor(mean).repeat_interleave(8).tolist(),
                                  std=torch.tensor(std).repeat_interleave(8).tolist())
    assert torch.equal(per_latent.encode(video), z)
    unnormalised = PatchAutoencoder(2, 2).encode(video)
    assert (unnormalised.std() - 1).abs() > 0.5  # the normalisation did something


def test_patch_errors_name_the_problem() -> None:
    ae = PatchAutoencoder(2, 4)
    with pytest.raises(ValueError, match=r"6 frames .* 1 \+ 4\*k"):
        ae.encode(_video(6))
    with pytest.raises(ValueError, match="not divisible by its spatial stride 2"):
        ae.encode(_video(5, H=7))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        ae.encode(torch.zeros(1, 4, 5, 8, 8))
    with pytest.raises(ValueError, match=r"decode expects latents \[B, 48, T, h, w\]"):
        ae.decode(torch.zeros(1, 12, 2, 4, 4))
    with pytest.raises(ValueError, match="3 values .* or 48"):
        PatchAutoencoder(2, 4, mean=[0.0, 0.0])
    with pytest.raises(ValueError, match="std must be positive"):
        PatchAutoencoder(2, 4, std=[1.0, 0.0, 1.0])
    assert ae.num_latents(13) == 4 and ae.num_frames(4) == 13


def test_build_autoencoder_registry() -> None:
    ae = build_autoencoder(AutoencoderConfig(kind="patch", patch_size=4, temporal_patch=2))
    assert isinstance(ae, PatchAutoencoder)
    assert (ae.spatial_stride, ae.temporal_stride, ae.latent_channels, ae.scaling_factor) == (4, 2, 96, 1.0)
    assert set(AUTOENCODERS) >= {"patch", "hunyuan15", "wan"}
    with pytest.raises(ValueError, match="unknown autoencoder 'vqgan'"):
        build_autoencoder(AutoencoderConfig(kind="vqgan"))


# ---------------------------------------------------------------- diffusers VAEs (tiny random configs)


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1, scaling_factor=0.5
    )
    root = tmp_path_factory.mktemp("hv15")
    vae.save_pretrained(root / "vae")  # pipeline-root layout: the loader looks in vae/
    return root, vae


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0],
    )
    path = tmp_path_factory.mktemp("wan")
    vae.save_pretrained(path)
    return path, vae


def test_hunyuan15_loads_and_follows_causal_grouping(hunyuan_dir) -> None:
    root, ref = hunyuan_dir
    ae = build_autoencoder(AutoencoderConfig(kind="hunyuan15", path=str(root)))
    assert isinstance(ae, HunyuanVideo15VAE)
    assert (ae.spatial_stride, ae.temporal_stride, ae.latent_channels, ae.scaling_factor) == (16, 4, 4, 0.5)
    video = _video(9, H=32, W=48, B=1)
    with torch.no_grad():
        z = ae.encode(video)
        assert z.shape == (1, 4, 3, 2, 3)  # 1 + 4k frames -> 1 + k latents
        raw = ref.encode(video).latent_dist.mode()
        torch.testing.assert_close(z, raw * 0.5)  # scaling factor read from the config
        out = ae.decode(z)
    assert out.shape == (1, 3, 9, 32, 48) and out.dtype == torch.float32
    assert out.abs().max() <= 1.0
    with pytest.raises(ValueError, match="hunyuan15 autoencoder: 7 frames"):
        ae.encode(_video(7, H=32, W=32, B=1))
    with pytest.raises(ValueError, match="spatial stride 16"):
        ae.encode(_video(5, H=24, W=32, B=1))


def test_hunyuan15_bf16_and_tiling(hunyuan_dir) -> None:
    root, _ = hunyuan_dir
    ae = build_autoencoder(AutoencoderConfig(kind="hunyuan15", path=str(root), dtype="bf16", tiling=True))
    assert ae.dtype == torch.bfloat16 and ae.vae.use_tiling
    with torch.no_grad():
        z = ae.encode(_video(5, H=32, W=32, B=1))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 2, 2, 2)


def test_wan_normalises_with_latents_mean_std(wan_dir) -> None:
    path, ref = wan_dir
    ae = build_autoencoder(AutoencoderConfig(kind="wan", path=str(path)))
    assert isinstance(ae, WanVAE)
    assert (ae.spatial_stride, ae.temporal_stride, ae.latent_channels, ae.scaling_factor) == (8, 4, 4, 1.0)
    video = _video(13, H=16, W=24, B=1)
    with torch.no_grad():
        z = ae.encode(video)
        assert z.shape == (1, 4, 4, 2, 3)
        raw = ref.encode(video).latent_dist.mode()
        mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
        std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(z, (raw - mean) / std)
        out = ae.decode(z)
        torch.testing.assert_close(out, ref.decode(raw).sample)  # decode undoes the normalisation
    assert out.shape == (1, 3, 13, 16, 24)
    assert ae.num_frames(4) == 13


def test_pretrained_vae_missing_directory_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}"):
        build_autoencoder(AutoencoderConfig(kind="wan", path=str(tmp_path)))
    with pytest.raises(ValueError, match="config.path must name"):
        build_autoencoder(AutoencoderConfig(kind="hunyuan15"))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        build_autoencoder(AutoencoderConfig(kind="hunyuan15", path=str(tmp_path), dtype="fp8"))
