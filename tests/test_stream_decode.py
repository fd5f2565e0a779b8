"""Streaming decode (``Autoencoder.stream_decoder``) equals the whole-video decode.

Tiny random-weight HunyuanVideo-1.5 and Wan (2.1 and 2.2 layouts) VAEs through diffusers, the patch
autoencoder, and the player's decode path. Tolerance: fp32, outputs of O(0.3-0.5) RMS; chunked
decoding reorders float sums (conv algorithms over other frame counts, attention split per frame),
measured max abs difference about 1e-6, asserted below ATOL = 1e-5. Controls show the comparison
is sensitive: decoding chunks without the caches, or with a truncated attention past, differs by
O(0.1-1).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from infer.image import to_uint8_frames
from infer.player import WorldPlayer
from models.autoencoders import AutoencoderConfig, HunyuanVideo15VAE, PatchAutoencoder, WanVAE
from models.bundle import save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.memory import MemoryConfig
from models.rollout import RolloutConfig
from models.text_encoders import TextEncoderConfig
from model_helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL = 1e-5
T = 7  # latents of the test video: 25 frames
SPLITS = [[1] * T, [2, 2, 2, 1], [4, 3], [3, 1, 3], [1, 4, 2], [T]]


def tiny_hunyuan15() -> HunyuanVideo15VAE:
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    return HunyuanVideo15VAE(AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1, scaling_factor=0.5))


def tiny_wan(v22: bool = False) -> WanVAE:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    kw = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
              latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    if v22:  # Wan 2.2 layout: residual up blocks (DupUp3D shortcuts with first_chunk), 2x2 patchified pixels
        kw.update(decoder_base_dim=8, is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    return WanVAE(AutoencoderKLWan(**kw))


def stream(ae, z: torch.Tensor, split: list[int], decoder=None) -> torch.Tensor:
    """Frames of z decoded chunk by chunk (chunk sizes ``split``) with one stream decoder."""
    sd = decoder if decoder is not None else ae.stream_decoder()
    out, a = [], 0
    for L in split:
        out.append(sd.decode(z[:, :, a : a + L]))
        a += L
    assert a == z.shape[2] and sd.num_latents == a and sd.num_frames == ae.num_frames(a)
    return torch.cat(out, dim=2)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def hunyuan():
    return tiny_hunyuan15()


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def wan(request):
    return tiny_wan(v22=request.param == "wan22")


@torch.no_grad()
def test_hunyuan15_stream_equals_whole_decode(hunyuan) -> None:
    z = torch.randn(1, 4, T, 2, 3, generator=torch.Generator().manual_seed(1))
    whole = hunyuan.decode(z)
    assert whole.shape == (1, 3, 25, 32, 48) and float(whole.std()) > 0.1
    diffs = {str(split): max_diff(stream(hunyuan, z, split), whole) for split in SPLITS}
    assert max(diffs.values()) < ATOL, diffs
    # controls: chunks decoded as separate videos, or with no attention past, are far off
    naive = torch.cat([hunyuan.decode(z[:, :, :4]), hunyuan.decode(z[:, :, 3:])[:, :, 1:]], dim=2)
    assert max_diff(naive, whole) > 0.1
    assert max_diff(stream(hunyuan, z, [4, 3], hunyuan.stream_decoder(attention_history=0)), whole) > 0.01
    # a bounded attention past that covers the whole video is still exact
    assert max_diff(stream(hunyuan, z, [2, 2, 2, 1], hunyuan.stream_decoder(attention_history=T - 1)), whole) < ATOL


@torch.no_grad()
def test_hunyuan15_reset_batch_and_layers_restored(hunyuan) -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    sd = hunyuan.stream_decoder()
    stream(hunyuan, z1, [2, 1], sd)
    sd.reset()  # a second video through the same decoder starts clean
    # diffusers 0.42's whole-video decode fails on batches > 1 (its attention mask broadcasts [B, B, N, N]),
    # so the reference decodes each sample alone; the stream takes the batch
    whole = torch.cat([hunyuan.decode(z2[i : i + 1]) for i in range(2)])
    assert max_diff(stream(hunyuan, z2, [1, 2], sd), whole) < ATOL
    # the overrides are gone after each call: a whole-video decode in between is unaffected
    assert not any("forward" in vars(m) for m in hunyuan.vae.modules())


@torch.no_grad()
def test_wan_stream_equals_whole_decode(wan) -> None:
    z = torch.randn(1, 4, T, 2, 3, generator=torch.Generator().manual_seed(3))
    whole = wan.decode(z)
    assert whole.shape == (1, 3, 25, 2 * wan.spatial_stride, 3 * wan.spatial_stride) and float(whole.std()) > 0.1
    diffs = {str(split): max_diff(stream(wan, z, split), whole) for split in SPLITS}
    assert max(diffs.values()) < ATOL, diffs
    # one latent per decoder call is diffusers' own loop: bit-equal
    torch.testing.assert_close(stream(wan, z, [3, 4], wan.stream_decoder(per_latent=True)), whole, rtol=0, atol=0)
    naive = torch.cat([wan.decode(z[:, :, :4]), wan.decode(z[:, :, 3:])[:, :, 1:]], dim=2)
    assert max_diff(naive, whole) > 0.1


@torch.no_grad()
def test_patch_stream_is_exact() -> None:
    ae = PatchAutoencoder(4, 4, mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
    z = torch.randn(2, ae.latent_channels, T, 3, 2, generator=torch.Generator().manual_seed(4))
    whole = ae.decode(z)
    for split in SPLITS:
        assert torch.equal(stream(ae, z, split), whole)


@torch.no_grad()
def test_stream_errors_name_the_shape(hunyuan) -> None:
    sd = hunyuan.stream_decoder()
    with pytest.raises(ValueError, match=r"stream decode expects latents \[B, 4, T, h, w\] \(T >= 1\), got \[1, 3, 2, 2, 2\]"):
        sd.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"got \[1, 4, 0, 2, 2\]"):
        sd.decode(torch.zeros(1, 4, 0, 2, 2))
    sd.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"continues a video of latents \[1, C, T, 2, 2\], got \[1, 4, 1, 2, 3\]"):
        sd.decode(torch.zeros(1, 4, 1, 2, 3))
    with pytest.raises(ValueError, match="attention_history must be >= 0"):
        hunyuan.stream_decoder(attention_history=-1)
    patch = PatchAutoencoder(2, 2).stream_decoder()
    with pytest.raises(ValueError, match=r"patch autoencoder: stream decode expects latents \[B, 24, T, h, w\]"):
        patch.decode(torch.zeros(1, 12, 1, 2, 2))


# ---------------------------------------------------------------------------- the player's decode path

H, W = 32, 48  # latent 2x3 with the tiny HunyuanVideo-1.5 VAE (16x)


def vae_bundle(root: Path) -> Path:
    """A tiny random WorldDiT bundle on the tiny HunyuanVideo-1.5 VAE (4 latent channels)."""
    tiny_hunyuan15().vae.save_pretrained(root / "vae")
    torch.manual_seed(0)
    cfg = replace(preset("tiny"), latent_channels=4)
    model = randomize(WorldDiT(cfg), 1)  # the default init zeroes the output layers: make the model do something
    mem = MemoryConfig(temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, num_points=500)
    samp = asdict(RolloutConfig(steps=1, memory=mem))
    samp.update(height=H, width=W, fps=12.0, model_type="ar")
    return save_bundle(root / "bundle", model, model_cfg=cfg,
                       autoencoder_cfg=AutoencoderConfig(kind="hunyuan15", path=str(root / "vae")),
                       text_encoder_cfg=TextEncoderConfig(kind="none", dim=cfg.text_dim), sampling=samp,
                       meta={"stage": "pretrain", "step": 1})


@pytest.fixture(scope="module")
def vae_player(tmp_path_factory) -> WorldPlayer:
    return WorldPlayer.from_bundle(vae_bundle(tmp_path_factory.mktemp("stream_player")))


def _image() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([128 + 90 * np.sin(x / 5.0 + c) * np.cos(y / 4.0) for c in range(3)], -1).astype(np.uint8)


def test_player_streams_frames_of_the_whole_decode(vae_player) -> None:
    p = vae_player
    assert p._stream is not None
    p.reset(_image(), seed=0)
    chunks = [p.step("w"), p.step("right"), p.step("d")]
    assert [c.shape[0] for c in chunks] == [13, 16, 16]
    with torch.no_grad():
        whole = to_uint8_frames(p.bundle.autoencoder.decode(p.latents.float()))
    got = np.concatenate(chunks)
    # uint8 of frames equal within ~1e-6: at most one rounding step apart, almost never
    diff = np.abs(got.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # reset starts a new stream: the same session again gives the same frames
    p.reset(_image(), seed=0)
    again = np.concatenate([p.step("w"), p.step("right"), p.step("d")])
    assert np.array_equal(again, got)


def test_player_reset_video_primes_the_stream(vae_player) -> None:
    p = vae_player
    p.reset(_image(), seed=1)
    first = np.concatenate([p.step("w"), p.step("d")])  # 29 frames = 8 latents of history
    used = p.reset_video(first, seed=2)
    assert p._stream.num_latents == p.num_latents == 8
    new = p.step("w")
    with torch.no_grad():
        whole = to_uint8_frames(p.bundle.autoencoder.decode(p.latents.float()))
    assert used.shape[0] + new.shape[0] == whole.shape[0]
    assert np.abs(new.astype(int) - whole[used.shape[0]:].astype(int)).max() <= 1
