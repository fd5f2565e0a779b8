"""Bundles: save -> load gives the same model; every kind of damage raises its named error."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.autoencoders import AutoencoderConfig, PatchAutoencoder
from models.bundle import (
    CONFIG,
    META,
    RAW_WEIGHTS,
    WEIGHTS,
    BundleConfigError,
    BundleCorruptError,
    BundleError,
    BundleExistsError,
    BundleFileError,
    BundleKeyError,
    BundleShapeError,
    load_bundle,
    read_bundle_config,
    read_bundle_meta,
    save_bundle,
)
from models.text_encoders import NoTextEncoder, TextEncoderConfig


@dataclass
class StandInConfig:
    width: int = 8
    depth: int = 2


class StandIn(nn.Module):
    """A small model built from a config dataclass, with a persistent and a non-persistent buffer."""

    def __init__(self, cfg: StandInConfig):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.register_buffer("scale", torch.ones(cfg.width))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x) * self.scale


def factory(section) -> nn.Module:
    return StandIn(StandInConfig(**section))


def _model(width: int = 8, seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    m = StandIn(StandInConfig(width=width))
    with torch.no_grad():
        m.scale.uniform_(0.5, 2.0)
        m.norm.weight.uniform_(0.5, 2.0)
    return m


def _save(path, model=None, **kw):
    model = _model() if model is None else model
    args = dict(
        model_cfg=StandInConfig(width=8),
        autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=2, temporal_patch=4),
        text_encoder_cfg=TextEncoderConfig(kind="none", dim=8),
        sampling={"steps": 4, "shift": 5.0, "guidance": 1.0, "schedule": "distilled", "chunk_size": 4,
                  "memory": {"recent": 4, "retrieved": 8}},
        meta={"stage": "pretrain", "step": 1200, "parent": "bundles/base", "data": "synthetic",
              "metrics": {"psnr": 21.5}},
    )
    args.update(kw)
    return save_bundle(path, model, **args)


def test_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    model = _model()
    path = _save(tmp_path / "b", model)
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, CONFIG, META])
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directory left behind

    bundle = load_bundle(path, model_factory=factory)
    x = torch.randn(5, 8)
    assert torch.equal(bundle.model(x), model(x))
    assert not bundle.model.training
    assert isinstance(bundle.autoencoder, PatchAutoencoder) and bundle.autoencoder.temporal_stride == 4
    assert isinstance(bundle.text_encoder, NoTextEncoder) and bundle.text_encoder.dim == 8
    assert bundle.sampling["schedule"] == "distilled" and bundle.sampling["memory"]["retrieved"] == 8

    meta = read_bundle_meta(path)
    assert (meta["stage"], meta["step"], meta["parent"], meta["metrics"]) == ("pretrain", 1200, "bundles/base", {"psnr": 21.5})
    assert meta["code_version"] and meta["created"] and len(meta["config_hash"]) == 16
    assert meta["num_parameters"] == sum(v.numel() for v in model.state_dict().values())
    assert meta["files"][WEIGHTS]["weights"] == "raw"
    assert read_bundle_config(path)["model"] == {"width": 8, "depth": 2}
    # The hash follows the config: same config, same hash; another config, another hash.
    assert read_bundle_meta(_save(tmp_path / "c", model))["config_hash"] == meta["config_hash"]
    other = _save(tmp_path / "d", model, sampling={"steps": 50})
    assert read_bundle_meta(other)["config_hash"] != meta["config_hash"]


def test_ema_weights_are_what_runs_and_raw_is_kept(tmp_path) -> None:
    model = _model()
    ema = {k: v + 0.25 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = _save(tmp_path / "b", model, ema_state=ema)
    assert (path / RAW_WEIGHTS).is_file() and read_bundle_meta(path)["files"][WEIGHTS]["weights"] == "ema"
    run = load_bundle(path, model_factory=factory)
    raw = load_bundle(path, model_factory=factory, weights="raw")
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, ema[k])
        assert torch.equal(raw.model.state_dict()[k], model.state_dict()[k])
    bad_ema = dict(ema)
    bad_ema.pop("norm.bias")
    with pytest.raises(BundleKeyError, match="ema_state vs model: missing keys: norm.bias"):
        _save(tmp_path / "e", model, ema_state=bad_ema)
    assert not (tmp_path / "e").exists()


def test_refuses_to_overwrite_unless_asked(tmp_path) -> None:
    path = _save(tmp_path / "b", _model(seed=0))
    with pytest.raises(BundleExistsError, match="already exists"):
        _save(path, _model(seed=1))
    _save(path, _model(seed=1), overwrite=True)
    x = torch.randn(2, 8)
    assert torch.equal(load_bundle(path, model_factory=factory).model(x), _model(seed=1)(x))
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_save_leaves_nothing(tmp_path) -> None:
    with pytest.raises(BundleError, match=r"meta\['metrics'\] is not JSON-serialisable"):
        _save(tmp_path / "b", meta={"metrics": {"psnr": object()}})
    assert list(tmp_path.iterdir()) == []


def test_dtype_and_module_state_dict_input(tmp_path) -> None:
    model = _model()
    path = _save(tmp_path / "b", model.state_dict())
    bundle = load_bundle(path, model_factory=factory, dtype=torch.bfloat16, load_autoencoder=False,
                         load_text_encoder=False)
    assert bundle.model.layers[0].weight.dtype == torch.bfloat16
    assert bundle.autoencoder is None and bundle.text_encoder is None
    assert torch.equal(bundle.model.layers[0].weight, model.layers[0].weight.bfloat16())


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG, META])
def test_missing_file_is_named(tmp_path, name) -> None:
    path = _save(tmp_path / "b")
    (path / name).unlink()
    with pytest.raises(BundleFileError, match=f"missing file {name}"):
        load_bundle(path, model_factory=factory)


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path / "b")
    state = load_file(path / WEIGHTS)
    state.pop("layers.1.bias")
    state["head.weight"] = torch.zeros(2)
    save_file(state, str(path / WEIGHTS))
    meta = read_bundle_meta(path)
    meta["files"].pop(WEIGHTS)  # a hand-edited file: skip the recorded size check
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(BundleKeyError, match="missing keys: layers.1.bias; unexpected keys: head.weight") as e:
        load_bundle(path, model_factory=factory)
    assert e.value.missing == ["layers.1.bias"] and e.value.unexpected == ["head.weight"]


def test_shape_mismatch_names_key_and_both_shapes(tmp_path) -> None:
    path = _save(tmp_path / "b")
    text = (path / CONFIG).read_text().replace("width: 8", "width: 6")
    (path / CONFIG).write_text(text)
    with pytest.raises(BundleShapeError, match=r"key 'layers.0.bias': model expects shape \[6\], weights have \[8\]") as e:
        load_bundle(path, model_factory=factory)
    assert (e.value.key, e.value.expected, e.value.found) == ("layers.0.bias", (6,), (8,))


def test_truncated_and_corrupted_weights(tmp_path) -> None:
    path = _save(tmp_path / "b")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleCorruptError, match=rf"{WEIGHTS} is \d+ bytes but was written as {len(data)}"):
        load_bundle(path, model_factory=factory)

    # Without a size record, safetensors' own header check catches the truncation.
    meta = read_bundle_meta(path)
    meta["files"] = {}
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(BundleCorruptError, match=f"{WEIGHTS} is not a valid safetensors file"):
        load_bundle(path, model_factory=factory)

    # Same size, one flipped byte in the tensor data: only the checksum sees it.
    path2 = _save(tmp_path / "c")
    data = bytearray((path2 / WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (path2 / WEIGHTS).write_bytes(bytes(data))
    load_bundle(path2, model_factory=factory)  # loads (no checksum by default) ...
    with pytest.raises(BundleCorruptError, match="fails its SHA-256 check"):
        load_bundle(path2, model_factory=factory, verify=True)


def test_config_errors_are_named(tmp_path) -> None:
    path = _save(tmp_path / "b")
    cfg = (path / CONFIG).read_text()
    (path / CONFIG).write_text(cfg.replace("width: 8", "widht: 8"))
    with pytest.raises(BundleConfigError, match="cannot build the model from config.yaml section 'model'.*widht"):
        load_bundle(path, model_factory=factory)
    (path / CONFIG).write_text(cfg.replace("patch_size: 2", "patch_sise: 2"))
    with pytest.raises(BundleConfigError, match="section 'autoencoder'.*patch_sise"):
        load_bundle(path, model_factory=factory)
    (path / CONFIG).write_text("model: {width: 8}\n")
    with pytest.raises(BundleConfigError, match="lacks section 'autoencoder'"):
        load_bundle(path, model_factory=factory)


def test_relative_paths_resolve_inside_the_bundle(tmp_path) -> None:
    from models.text_encoders import PrecomputedTextEncoder, save_precomputed

    path = _save(tmp_path / "b", text_encoder_cfg=TextEncoderConfig(kind="precomputed", path="text.safetensors"))
    save_precomputed(path / "text.safetensors", {"": torch.zeros(0, 8), "go": torch.ones(2, 8)})
    bundle = load_bundle(path, model_factory=factory)
    assert isinstance(bundle.text_encoder, PrecomputedTextEncoder)
    assert bundle.text_encoder.encode(["go"])[1].sum() == 2


def test_worlddit_bundle_with_the_default_factory(tmp_path) -> None:
    """The real model: preset 'tiny' saved and loaded through WorldDiTConfig, outputs identical."""
    from models.config import preset
    from models.dit import WorldDiT

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = WorldDiT(cfg)
    with torch.no_grad():  # leave the zero-initialised init: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = _save(tmp_path / "dit", model, model_cfg=cfg,
                 text_encoder_cfg=TextEncoderConfig(kind="none", dim=cfg.text_dim))
    bundle = load_bundle(path)
    assert isinstance(bundle.model, WorldDiT) and bundle.model.cfg == cfg

    B, C, T, H, W = 1, cfg.latent_channels, 3, 4, 4
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        x=torch.randn(B, C, T, H, W, generator=g),
        sigma=torch.rand(B, T, generator=g),
        actions=torch.randint(0, 81, (B, T), generator=g),
        text=torch.randn(B, 5, cfg.text_dim, generator=g),
    )
    with torch.no_grad():
        expected = model.eval()(**inputs)
        got = bundle.model(**inputs)
    assert expected.abs().sum() > 0
    assert torch.equal(got, expected)
    # A bundle of another preset's shape cannot load these weights: the first bad key is named.
    text = (path / CONFIG).read_text().replace(f"hidden: {cfg.hidden}", "hidden: 32").replace(
        f"head_dim: {cfg.head_dim}", "head_dim: 8").replace("- 4\n  - 6\n  - 6", "- 2\n  - 2\n  - 4")
    (path / CONFIG).write_text(text)
    with pytest.raises(BundleShapeError, match=r"model expects shape \[.*32.*\], weights have \[.*64.*\]"):
        load_bundle(path)
