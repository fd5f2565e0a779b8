"""LPIPS: torchvision layout of the trunk, the shipped linear weights, metric properties, and
agreement with the reference ``lpips`` package (run against the same random trunk via import stubs)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from eval.lpips import LPIPS, AlexNetFeatures, LPIPSConfig, default_linear_path, load_alexnet_trunk

# torchvision.models.alexnet().state_dict(), written out: key -> shape.
TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11),
    "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3),
    "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3),
    "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216),
    "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096),
    "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


@pytest.fixture
def no_trunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME, so no AlexNet checkpoint can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def _random_lpips() -> LPIPS:
    model = LPIPS(LPIPSConfig(allow_random_trunk=True))
    assert model.available and not model.perceptual
    return model


def _images(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_trunk_state_dict_has_torchvision_layout() -> None:
    sd = AlexNetFeatures().state_dict()
    expected = {k: v for k, v in TORCHVISION_ALEXNET.items() if k.startswith("features.")}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # A full torchvision state dict (ImageNet head included) loads; its classifier is ignored.
    g = torch.Generator().manual_seed(1)
    full = {k: torch.randn(s, generator=g) if k.startswith("features.") else torch.empty(s) for k, s in TORCHVISION_ALEXNET.items()}
    trunk = AlexNetFeatures()
    load_alexnet_trunk(trunk, full, "torchvision-like")
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, full[k])


def test_trunk_loader_names_the_bad_key() -> None:
    sd = {k: torch.zeros(s) for k, s in TORCHVISION_ALEXNET.items() if k.startswith("features.")}
    bad = dict(sd, **{"features.3.weight": torch.zeros(192, 64, 3, 3)})
    with pytest.raises(ValueError, match=r"ckpt.pth: key features.3.weight has shape \(192, 64, 3, 3\)"):
        load_alexnet_trunk(AlexNetFeatures(), bad, "ckpt.pth")
    missing = {k: v for k, v in sd.items() if k != "features.10.bias"}
    with pytest.raises(ValueError, match=r"missing \['features.10.bias'\]"):
        load_alexnet_trunk(AlexNetFeatures(), missing, "ckpt.pth")


def test_shipped_linear_weights_load(no_trunk: Path) -> None:
    path = default_linear_path()
    assert path is not None and path.parts[-3:] == ("weights", "v0.1", "alex.pth")
    assert "lpips" not in sys.modules or not hasattr(sys.modules["lpips"], "LPIPS")  # found without importing
    ref = torch.load(path, map_location="cpu", weights_only=True)
    model = _random_lpips()
    for k, (lin, c) in enumerate(zip(model.lins, (64, 192, 384, 256, 256))):
        assert lin.weight.shape == (1, c, 1, 1)
        assert torch.equal(lin.weight, ref[f"lin{k}.model.1.weight"])
        assert (lin.weight >= 0).all() and lin.weight.sum() > 0  # trained LPIPS weights are non-negative


def test_unavailable_without_trunk_weights(no_trunk: Path) -> None:
    model = LPIPS()
    assert not model.available
    assert model.status().startswith("LPIPS unavailable: AlexNet trunk weights not found at ")
    assert str(no_trunk / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in model.status()
    with pytest.raises(RuntimeError, match="LPIPS unavailable"):
        model(_images(), _images())
    missing_lin = LPIPS(LPIPSConfig(linear_path=str(no_trunk / "nope.pth"), allow_random_trunk=True))
    assert not missing_lin.available and "nope.pth" in missing_lin.status()


def test_trunk_checkpoint_file_makes_it_perceptual(no_trunk: Path) -> None:
    src = AlexNetFeatures()
    ckpt = no_trunk / "alexnet.pth"
    torch.save(src.state_dict(), ckpt)
    model = LPIPS(LPIPSConfig(trunk_path=str(ckpt)))
    assert model.available and model.perceptual and str(ckpt) in model.status()
    for k, v in src.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[k], v)


def test_metric_properties(no_trunk: Path) -> None:
    model = _random_lpips()
    x, y = _images(seed=2), _images(seed=3)
    assert torch.equal(model(x, x), torch.zeros(3))
    torch.testing.assert_close(model(x, y), model(y, x))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    d = [model(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert d[0] == 0.0 and all(b > a for a, b in zip(d, d[1:])), d
    # uint8 [B, H, W, 3] frames give the same value as their float version.
    u = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    v = (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    torch.testing.assert_close(model(u, v), model(u.permute(0, 3, 1, 2).float() / 255, v.permute(0, 3, 1, 2).float() / 255))


def test_matches_reference_lpips_package(no_trunk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference implementation, fed the same trunk modules, gives the same distances."""
    ours = _random_lpips()
    fake_models = types.ModuleType("torchvision.models")
    trunk = types.SimpleNamespace(features=ours.trunk.features)  # what torchvision.models.alexnet() would expose
    fake_models.alexnet = lambda pretrained=False, **_: trunk  # type: ignore[attr-defined]
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = fake_models  # type: ignore[attr-defined]
    fake_ndimage = types.ModuleType("scipy.ndimage")
    fake_ndimage.zoom = None  # type: ignore[attr-defined]  # only imported by lpips.trainer
    fake_scipy = types.ModuleType("scipy")
    fake_scipy.ndimage = fake_ndimage  # type: ignore[attr-defined]
    stubs = {"torchvision": fake_tv, "torchvision.models": fake_models, "scipy": fake_scipy, "scipy.ndimage": fake_ndimage}
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    before = set(sys.modules)
    try:
        import lpips  # noqa: PLC0415

        ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    finally:
        for name in set(sys.modules) - before:
            if name == "lpips" or name.startswith("lpips."):
                del sys.modules[name]
    x, y = _images(n=2, size=96, seed=5), _images(n=2, size=96, seed=6)
    expected = ref(x, y, normalize=True).flatten()
    torch.testing.assert_close(ours(x, y), expected, atol=1e-6, rtol=1e-5)
