"""Latent precompute: shards with latents, windows cut from them, stages training on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.indexed import ShardDataset
from data.precompute import main as precompute
from models.autoencoders import AutoencoderConfig, build_autoencoder
from train.data import DataConfig, build_train_loader


@pytest.fixture(scope="module")
def latent_set(two_clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    assert precompute(["--src", str(two_clips), "--out", str(out), "--size", "16x16", "--patch-size", "4", "--temporal-patch", "4", "--device", "cpu"]) == 0
    return out


def test_precomputed_latents_encode_the_stored_video(latent_set):
    clip = ShardDataset(latent_set)[0]
    ae = build_autoencoder(AutoencoderConfig(kind="patch", patch_size=4, temporal_patch=4))
    video = torch.from_numpy(clip["video"]).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0)
    expect = ae.encode(video)[0].numpy()
    assert clip["latents"].shape == expect.shape == (192, 9, 4, 4)  # 33 frames = 1 + 4 * 8
    assert np.abs(clip["latents"].astype(np.float32) - expect).max() < 2e-3  # stored as float16
    assert clip["meta"]["latents"]["temporal_stride"] == 4


def test_windows_come_from_latents_with_matching_poses(latent_set, two_clips):
    cfg = DataConfig(path=str(latent_set), num_latents=4, height=16, width=16, batch_size=2, window="random")
    b = next(build_train_loader(cfg, 4, seed=3))
    assert "video" not in b and b["latents"].shape == (2, 192, 4, 4, 4)
    assert torch.allclose(b["c2w"][:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-6)
    # the same window from video shards has the same poses and actions when it starts at latent 0
    cfg0 = DataConfig(path=str(latent_set), num_latents=4, height=16, width=16, batch_size=2, window="start", shuffle=False)
    cfgv = DataConfig(path=str(two_clips), num_latents=4, height=16, width=16, batch_size=2, window="start", shuffle=False)
    a, v = next(build_train_loader(cfg0, 4, seed=0)), next(build_train_loader(cfgv, 4, seed=0))
    assert torch.allclose(a["c2w"], v["c2w"], atol=1e-5) and torch.equal(a["actions"], v["actions"])
    with pytest.raises(ValueError, match="precomputed at 16x16"):
        next(build_train_loader(DataConfig(path=str(latent_set), num_latents=4, height=32, width=32, batch_size=2), 4, seed=0))


def test_a_stage_trains_on_precomputed_latents(latent_set, tmp_path):
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register_configs
    from train.run import run

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=[
            "experiment=demo", f"data.path={latent_set}", "data.height=16", "data.width=16", "data.num_latents=4", "data.batch_size=2",
            "autoencoder.patch_size=4", "autoencoder.temporal_patch=4", "model.latent_channels=192", "model.hidden=192", "model.heads=12",
            "trainer.steps=2", "logger.progress_bar=false", "checkpoint.every=0", "trainer.export=false",
        ])
    assert run(cfg, tmp_path / "run").status == "completed"
