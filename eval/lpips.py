"""LPIPS (Zhang et al. 2018, v0.1, AlexNet) without torchvision.

The AlexNet feature trunk is written here in plain torch with torchvision's module layout
(``features.{0,3,6,8,10}``), so torchvision's ImageNet checkpoint ``alexnet-owt-7be5be79.pth``
loads into it unchanged. The trained linear layers are the ones shipped inside the ``lpips``
wheel (``lpips/weights/v0.1/alex.pth``); we locate that file without importing ``lpips``,
whose import pulls torchvision.

Distance (identical to the reference package with ``normalize=True``):
frames in [0, 1] -> x in [-1, 1] -> (x - shift) / scale -> AlexNet relu1..relu5 features ->
unit-normalise each feature vector over channels -> squared difference -> 1x1 linear layer ->
mean over space -> sum over the five layers. One value per frame pair, [B].

Without trunk weights the metric is *unavailable*: ``LPIPS.available`` is False and ``reason``
says why; reports print ``status()`` ("LPIPS unavailable: <reason>"). ``allow_random_trunk``
runs a randomly initialised trunk for tests only: its numbers are not perceptual.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from eval.metrics import to_float_frames

__all__ = [
    "LPIPSConfig",
    "LPIPS",
    "AlexNetFeatures",
    "ALEXNET_CHECKPOINT",
    "ALEXNET_FEATURE_SHAPES",
    "LPIPS_CHANNELS",
    "default_trunk_path",
    "default_linear_path",
    "load_alexnet_trunk",
]

ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"
# torchvision AlexNet ``features`` parameters: key -> shape (the checkpoint's classifier.* keys are unused).
ALEXNET_FEATURE_SHAPES: dict[str, tuple[int, ...]] = {
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
}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS v0.1 input scaling layer (ImageNet statistics expressed for inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_TAPS = (1, 4, 7, 9, 11)  # indices in ``features`` of relu1..relu5
_EPS = 1e-10


@dataclass
class LPIPSConfig:
    """Where LPIPS finds its weights. ``None`` paths mean the standard locations."""

    trunk_path: str | None = None  # torchvision alexnet-owt-7be5be79.pth; default $TORCH_HOME/hub/checkpoints/
    linear_path: str | None = None  # LPIPS v0.1 alex.pth; default: inside the installed lpips package
    allow_random_trunk: bool = False  # tests only: random trunk, results are not perceptual
    random_seed: int = 0  # initialisation of the random trunk (reproducible test values)


class AlexNetFeatures(nn.Module):
    """AlexNet convolutional trunk with torchvision's ``features`` layout; forward returns relu1..relu5.

    Input [B, 3, H, W] (already scaled); outputs [B, C_l, H_l, W_l] with C = 64, 192, 384, 256, 256.
    torchvision's trailing max-pool (``features.12``) has no parameters and no role in LPIPS.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(),  # 1 -> relu1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),  # 4 -> relu2
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),  # 7 -> relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),  # 9 -> relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),  # 11 -> relu5
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                outs.append(x)
        return outs


def default_trunk_path() -> Path:
    """$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (where torchvision would cache it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT


def default_linear_path() -> Path | None:
    """lpips/weights/v0.1/alex.pth inside the installed ``lpips`` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "v0.1" / "alex.pth"
        if path.is_file():
            return path
    return None


def load_alexnet_trunk(trunk: AlexNetFeatures, state_dict: dict[str, Tensor], where: str) -> None:
    """Copy torchvision AlexNet weights into ``trunk``; every ``features.*`` key must match exactly.

    ``classifier.*`` keys (the ImageNet head) are ignored. Raises ValueError naming ``where`` and the key.
    """
    feats = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    missing = sorted(set(ALEXNET_FEATURE_SHAPES) - set(feats))
    unexpected = sorted(set(feats) - set(ALEXNET_FEATURE_SHAPES))
    if missing or unexpected:
        raise ValueError(f"{where}: not a torchvision AlexNet state dict (missing {missing}, unexpected {unexpected})")
    for key, shape in ALEXNET_FEATURE_SHAPES.items():
        if tuple(feats[key].shape) != shape:
            raise ValueError(f"{where}: key {key} has shape {tuple(feats[key].shape)}, expected {shape}")
    trunk.load_state_dict(feats, strict=True)


def _load_linear(lins: nn.ModuleList, path: Path) -> None:
    """Load LPIPS linear weights (keys ``lin{k}.model.1.weight`` [1, C_k, 1, 1]) into ``lins``."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for k, conv in enumerate(lins):
        key = f"lin{k}.model.1.weight"
        if key not in sd:
            raise ValueError(f"{path}: missing key {key} (keys: {sorted(sd)})")
        if tuple(sd[key].shape) != tuple(conv.weight.shape):
            raise ValueError(f"{path}: key {key} has shape {tuple(sd[key].shape)}, expected {tuple(conv.weight.shape)}")
        conv.weight.data.copy_(sd[key])


def _unit_normalize(f: Tensor) -> Tensor:
    """Normalise feature vectors [B, C, H, W] to unit length over channels (LPIPS eps placement)."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + _EPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet trunk; ``forward(a, b)`` -> [B] distances (0 = identical).

    Frames as in ``eval.metrics``: float [B, 3, H, W] in [0, 1] or uint8 [B, H, W, 3]. The module
    has no trainable parameters; move it with ``.to(device)``.
    """

    def __init__(self, config: LPIPSConfig | None = None) -> None:
        super().__init__()
        self.config = config or LPIPSConfig()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.random_seed)
            self.trunk = AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.available = False
        self.perceptual = False
        self.reason: str | None = None
        self.trunk_source: str | None = None
        self._load()
        self.requires_grad_(False)
        self.eval()

    def _load(self) -> None:
        cfg = self.config
        lin_path = Path(cfg.linear_path) if cfg.linear_path else default_linear_path()
        if lin_path is None:
            self.reason = (
                "lpips linear weights not found: the lpips package is not installed (pip install --no-deps lpips==0.1.4)"
            )
            return
        if not lin_path.is_file():
            self.reason = f"lpips linear weights not found at {lin_path}"
            return
        _load_linear(self.lins, lin_path)
        trunk_path = Path(cfg.trunk_path) if cfg.trunk_path else default_trunk_path()
        if trunk_path.is_file():
            sd = torch.load(trunk_path, map_location="cpu", weights_only=True)
            load_alexnet_trunk(self.trunk, sd, str(trunk_path))
            self.available, self.perceptual, self.trunk_source = True, True, str(trunk_path)
        elif cfg.allow_random_trunk:
            self.available, self.perceptual = True, False
            self.trunk_source = f"random (seed {cfg.random_seed})"
            self.reason = f"random AlexNet trunk: {trunk_path} not found; values are not perceptual (tests only)"
        else:
            self.reason = f"AlexNet trunk weights not found at {trunk_path} (set LPIPSConfig.trunk_path or TORCH_HOME)"

    def status(self) -> str:
        """One line for reports: what LPIPS is computing, or why it is unavailable."""
        if not self.available:
            return f"LPIPS unavailable: {self.reason}"
        if not self.perceptual:
            return f"LPIPS NOT PERCEPTUAL: {self.reason}"
        return f"LPIPS v0.1 AlexNet (trunk {self.trunk_source})"

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance per frame pair, [B] float32 on the module's device."""
        if not self.available:
            raise RuntimeError(self.status())
        fa, fb = to_float_frames(a, "a"), to_float_frames(b, "b")
        if fa.shape != fb.shape:
            raise ValueError(f"a and b must have the same shape, got {tuple(fa.shape)} and {tuple(fb.shape)}")
        dev, dt = self.shift.device, self.lins[0].weight.dtype
        n = fa.shape[0]
        x = torch.cat([fa, fb]).to(device=dev, dtype=dt) * 2.0 - 1.0
        feats = self.trunk((x - self.shift.to(dt)) / self.scale.to(dt))
        total = torch.zeros(n, device=dev, dtype=dt)
        for f, lin in zip(feats, self.lins):
            f = _unit_normalize(f)
            diff = (f[:n] - f[n:]).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total
