"""Generating evaluation video from a model: a thin layer over ``models.rollout.Rollout``.

``VideoModel.generate(image, c2w, K)`` conditions on one image and a latent-rate camera path and
returns decoded frames, exactly as inference does: poses are re-based to the first camera, action
ids come from the poses with the bundle's thresholds (``data.latents.latent_action_ids``),
intrinsics are normalised, latent 0 is the encoded image. The path must have a whole number of
rollout units (``chunk_size`` latents in ``ar`` mode, ``window_latents`` in ``window`` mode).

A bundle's ``sampling`` section is a ``RolloutConfig`` plus keys describing its video (height,
width, motion units, action thresholds): :func:`settings_from_sampling` splits it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from data.actions import MotionSteps, MotionThresholds
from data.geometry import invert_rigid, is_rigid, normalize_intrinsics, rebase_to_first
from data.latents import latent_action_ids, num_frames
from models.rollout import Rollout, RolloutConfig
from models.sampling import VIDEO_KEYS, split_sampling

__all__ = ["EvalSettings", "VIDEO_KEYS", "settings_from_sampling", "Request", "VideoModel", "to_uint8_video"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class EvalSettings:
    """What generation needs to know about a model: its sampler, resolution and motion units."""

    rollout: RolloutConfig
    height: int
    width: int
    steps: MotionSteps = MotionSteps()  # pose increments per latent of a held key
    thresholds: MotionThresholds = MotionThresholds()  # pose -> action id rule used in training
    train_latents: Optional[int] = None  # the training window, when the bundle records it

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout": dataclasses.asdict(self.rollout), "height": self.height, "width": self.width,
            "steps": dataclasses.asdict(self.steps), "thresholds": dataclasses.asdict(self.thresholds),
            "train_latents": self.train_latents,
        }


def settings_from_sampling(
    sampling: Union[Mapping[str, Any], RolloutConfig],
    where: str,
    *,
    height: Optional[int] = None,
    width: Optional[int] = None,
    steps: Optional[int] = None,
    train_latents: Optional[int] = None,
) -> EvalSettings:
    """Eval settings from a bundle's sampling section (or a RolloutConfig plus height/width).

    ``where`` names the source in errors; ``height``/``width`` override or stand in for the
    recorded size; ``steps`` overrides the Euler step count. Unknown keys raise ValueError.
    """
    rcfg, video = split_sampling(sampling, where)
    if video.get("model_type") == "bidirectional" and rcfg.mode != "window":
        rcfg = replace(rcfg, mode="window")  # full attention only matches window mode (as infer does)
    if steps is not None:
        rcfg = replace(rcfg, steps=int(steps))
    h = height if height is not None else video.get("height")
    w = width if width is not None else video.get("width")
    if h is None or w is None:
        raise ValueError(f"{where}: the video size is unknown: sampling has no height/width and none was given")
    return EvalSettings(
        rollout=rcfg, height=int(h), width=int(w),
        steps=MotionSteps(float(video.get("translation_step", MotionSteps.translation)),
                          float(video.get("rotation_step_deg", MotionSteps.rotation_deg))),
        thresholds=MotionThresholds(translation=float(video.get("translation_threshold", MotionThresholds.translation)),
                                    rotation_deg=float(video.get("rotation_threshold_deg", MotionThresholds.rotation_deg))),
        train_latents=train_latents,
    )


def to_uint8_video(video: Tensor) -> np.ndarray:
    """Decoded video [B, 3, F, H, W] in about [-1, 1] -> uint8 frames [B, F, H, W, 3]."""
    x = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


@dataclass
class Request:
    """One video to generate: first frame uint8 [H, W, 3], latent-rate poses c2w [T, 4, 4], intrinsics
    K [3, 3] or [T, 3, 3] (pixels), an optional caption and the seed of its noise."""

    image: np.ndarray
    c2w: Tensor
    K: Tensor
    caption: Optional[str] = None
    seed: int = 0


class VideoModel:
    """A world model with its autoencoder (and optional text encoder), ready to generate evaluation video."""

    def __init__(
        self,
        model: nn.Module,
        autoencoder: nn.Module,
        settings: EvalSettings,
        *,
        text_encoder: Optional[nn.Module] = None,
        device: Union[str, torch.device] = "cpu",
        name: str = "model",
    ):
        self.model, self.autoencoder, self.text_encoder = model, autoencoder, text_encoder
        self.settings, self.device, self.name = settings, torch.device(device), name
        self.meta: dict[str, Any] = {}  # the bundle's meta.json when loaded from a bundle
        s = autoencoder.spatial_stride
        if settings.height % s or settings.width % s:
            raise ValueError(f"{name}: video size {settings.height}x{settings.width} is not a multiple of the autoencoder's spatial stride {s}")
        channels = getattr(getattr(model, "cfg", None), "latent_channels", autoencoder.latent_channels)
        if channels != autoencoder.latent_channels:
            raise ValueError(f"{name}: the model expects {channels} latent channels, the autoencoder makes {autoencoder.latent_channels}")
        self.rollout = Rollout(model, settings.rollout)

    @classmethod
    def from_bundle(
        cls, directory: Union[str, os.PathLike], *, device: str = "cpu", dtype: str = "fp32",
        steps: Optional[int] = None, name: Optional[str] = None, sampling: Sequence[str] = (),
    ) -> "VideoModel":
        """Load a bundle (strictly) and wrap it; ``steps`` overrides its denoising steps, ``sampling`` is a
        dotlist of overrides of its sampling section (``["memory.spatial_chunks=0", "guidance=2"]``) for ablations."""
        from models.bundle import load_bundle, read_bundle_config, read_bundle_meta

        directory = Path(directory)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        meta = read_bundle_meta(directory)
        window = (meta.get("data") or {}).get("num_latents") if isinstance(meta.get("data"), Mapping) else None
        # The sampling section is checked before any weights are read.
        section = read_bundle_config(directory)["sampling"]
        if sampling:
            from omegaconf import OmegaConf

            merged = OmegaConf.merge(OmegaConf.create(dict(section)), OmegaConf.from_dotlist(list(sampling)))
            section = OmegaConf.to_container(merged, resolve=True)  # overrides may refer to the section's own keys
        settings = settings_from_sampling(section, f"bundle {directory}" + (f" with {list(sampling)}" if sampling else ""),
                                          steps=steps, train_latents=None if window is None else int(window))
        bundle = load_bundle(directory, device=device, dtype=_DTYPES[dtype])
        vm = cls(bundle.model, bundle.autoencoder, settings, text_encoder=bundle.text_encoder, device=device,
                 name=name or directory.name)
        vm.meta = bundle.meta
        return vm

    # ------------------------------------------------------------------ properties
    @property
    def unit(self) -> int:
        """Latents per rollout call: trajectories have a multiple of this many latents."""
        return self.settings.rollout.unit

    @property
    def stride(self) -> int:
        """Video frames per latent (the autoencoder's temporal stride)."""
        return int(self.autoencoder.temporal_stride)

    def fit_length(self, max_latents: int) -> int:
        """The longest trajectory (latents) of whole rollout units not above ``max_latents`` (0 if none fits)."""
        return max(0, int(max_latents)) // self.unit * self.unit

    # ------------------------------------------------------------------ generation
    def generate(
        self, image: np.ndarray, c2w: Tensor, K: Tensor, caption: Optional[str] = None, seed: int = 0
    ) -> np.ndarray:
        """Frames uint8 [F, H, W, 3], F = 1 + stride * (T - 1), from the first frame and a latent-rate path.

        image: uint8 [H, W, 3] (the model's resolution). c2w: [T, 4, 4] poses of the latents (any
        world frame: re-based here). K: pixel intrinsics [3, 3] or [T, 3, 3] at the model's resolution.
        """
        return self.generate_many([Request(image, c2w, K, caption, seed)])[0]

    def generate_many(self, requests: Sequence["Request"], batch: int = 8) -> list[np.ndarray]:
        """:meth:`generate` for each request, up to ``batch`` rows per rollout; one frames array per request.

        Consecutive requests with the same path length and caption (when the model reads captions) share a rollout. Each row draws its
        noise from its own seed, so a clip's video does not depend on the batch it was generated in (up to
        floating-point reduction order). Window-mode models roll out one request at a time (the union of
        retrieved chunks differs between trajectories).
        """
        if batch < 1:
            raise ValueError(f"{self.name}: generate_many batch must be >= 1, got {batch}")
        if self.settings.rollout.mode != "ar":
            batch = 1
        prepared = [self._prepare(r) for r in requests]
        captions = [r.caption if self._reads_text() else None for r in requests]  # ignored captions do not split batches
        out: list[np.ndarray] = []
        i = 0
        while i < len(prepared):
            j = i + 1
            while j < len(prepared) and j - i < batch and prepared[j][4] == prepared[i][4] and captions[j] == captions[i]:
                j += 1
            out.extend(self._generate_rows(prepared[i:j], captions[i], [int(r.seed) for r in requests[i:j]]))
            i = j
        return out

    def _reads_text(self) -> bool:
        """Whether captions reach the model (a text encoder and a text stream)."""
        return self.text_encoder is not None and getattr(getattr(self.model, "cfg", None), "text_dim", 1) > 0

    def _prepare(self, req: "Request") -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Check one request; (frame [3, H, W] in [-1, 1], actions [T], w2c [T, 4, 4], K normalised [T, 3, 3], T)."""
        H, W = self.settings.height, self.settings.width
        image = np.asarray(req.image)
        if image.dtype != np.uint8 or image.shape != (H, W, 3):
            raise ValueError(f"{self.name}: image must be uint8 [{H}, {W}, 3], got {image.dtype} {list(image.shape)}")
        c2w = torch.as_tensor(req.c2w, dtype=torch.float64)
        T = c2w.shape[0] if c2w.ndim == 3 else -1
        if c2w.shape[-2:] != (4, 4) or T < 1:
            raise ValueError(f"{self.name}: c2w must be [T, 4, 4], got {list(c2w.shape)}")
        if T % self.unit:
            raise ValueError(f"{self.name}: {self.settings.rollout.mode} mode generates whole units of {self.unit} latents; "
                             f"got a path of {T} latents (use VideoModel.fit_length)")
        if not bool(is_rigid(c2w).all()):
            raise ValueError(f"{self.name}: c2w[{int((~is_rigid(c2w)).nonzero()[0])}] is not a rigid transform")
        K = torch.as_tensor(req.K, dtype=torch.float64)
        K = K.expand(T, 3, 3) if K.shape == (3, 3) else K
        if K.shape != (T, 3, 3):
            raise ValueError(f"{self.name}: K must be [3, 3] or [T={T}, 3, 3] pixel intrinsics, got {list(K.shape)}")
        c2w = rebase_to_first(c2w)
        frame = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return frame, latent_action_ids(c2w, self.settings.thresholds), invert_rigid(c2w).float(), \
            normalize_intrinsics(K, W, H).float(), T

    def _generate_rows(self, rows: list[tuple[Tensor, Tensor, Tensor, Tensor, int]], caption: Optional[str],
                       seeds: list[int]) -> list[np.ndarray]:
        """One batched rollout of prepared requests of equal length T; frames uint8 [F, H, W, 3] per row."""
        dev, T, B = self.device, rows[0][4], len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                frames = torch.stack([r[0] for r in rows])[:, :, None].to(dev)  # [B, 3, 1, H, W]
                image_latent = self.autoencoder.encode(frames)[:, :, 0]
                text, mask = self._encode_caption(caption)
                if text is not None:
                    text = text.expand(B, *text.shape[1:])
                    mask = None if mask is None else mask.expand(B, *mask.shape[1:])
                gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
                res = self.rollout.generate(
                    image_latent, torch.stack([r[1] for r in rows]).to(dev), torch.stack([r[2] for r in rows]).to(dev),
                    torch.stack([r[3] for r in rows]).to(dev), text, mask, generator=gens,
                )
                video = to_uint8_video(self.autoencoder.decode(res.latents.float()))
        finally:
            self.model.train(was_training)
        expected = num_frames(T, self.stride)
        if video.shape[1] != expected:
            raise RuntimeError(f"{self.name}: decoded {video.shape[1]} frames from {T} latents, expected {expected}")
        return list(video)

    def _encode_caption(self, caption: Optional[str]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(tokens [1, L, D], mask [1, L] or None); (None, None) without a caption or text stream."""
        te = self.text_encoder
        if not caption or not self._reads_text():
            return None, None
        try:
            tokens, mask = te.encode([caption])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{self.name}: the {te.name} text encoder cannot encode caption {caption!r}: {e}") from None
        if tokens.shape[1] == 0:
            return None, None
        return tokens.to(self.device), (None if bool(mask.all()) else mask.to(self.device))
