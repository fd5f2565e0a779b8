"""The training data pipeline: clips -> windows of latent frames, resumable and rank-aware.

Each sample is a window of ``num_latents`` latent frames cut from a clip (``1 + stride*(T-1)``
video frames, ``data.latents`` grouping), centre- or randomly-cropped to the target aspect and
resized with ``K`` updated, poses rebased to the window's first camera. Per latent it carries the
pose, the normalised intrinsics and the 81-class action id.

Order and randomness are functions of (seed, epoch, sample index) only, so a run resumed from
``state_dict()`` sees exactly the batches the uninterrupted run would have seen, whatever the
number of DataLoader workers (``train.resumable.ResumableLoader`` with a keyed dataset).

Mixtures (``data.mixture``, as WorldPlay mixes its sources): several shard datasets with weights.
Sample key (epoch, index) draws its source with probability proportional to the weights, then a
clip of that source uniformly, then its window, all from the key's generator, so mixing keeps
exact resume. Sources may differ in clip size: every window is framed to the config size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.actions import MotionThresholds, keys_to_action_id
from data.geometry import invert_rigid, normalize_intrinsics, rebase_to_first
from data.indexed import ShardDataset
from data.transforms import crop_resize
from data.latents import latent_action_ids, latent_frame_index, latent_keys_from_frames, num_frames
from train.resumable import ResumableLoader


@dataclass
class MixtureSource:
    """One shard dataset of a mixture and its sampling weight (relative; need not sum to 1)."""

    path: str = ""  # dataset directory holding index.json and shards
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where clips come from and how they become training windows."""

    path: str = ""  # dataset directory holding index.json and shards (unused when mixture is set)
    # Several datasets with weights, e.g. data.mixture=[{path: a, weight: 0.5}, {path: b, weight: 0.5}];
    # when non-empty it replaces ``path``.
    mixture: list[MixtureSource] = field(default_factory=list)
    num_latents: int = 8  # latent frames per training window (the curriculum may lengthen clips)
    height: int = 64  # output frame size after crop + resize
    width: int = 64
    crop: str = "center"  # center | random
    action_source: str = "poses"  # poses: from relative motion (every source) | keys: recorded keys
    translation_threshold: float = 0.01  # pose -> keys thresholds (research/worldplay.md §3.1)
    rotation_threshold_deg: float = 0.05
    batch_size: int = 2  # per rank, per micro-batch
    num_workers: int = 0
    shuffle: bool = True
    window: str = "random"  # random | start: where in a clip the window begins
    prefetch_factor: int = 2
    # The command that writes ``path`` ({path} is replaced by it), named when the directory is missing.
    make_command: str = ""


def _seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (independent of Python's hash randomisation)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class WindowDataset(Dataset):
    """Map-style dataset of training windows over a shard dataset.

    ``__getitem__((epoch, index))`` is deterministic: the window start and the crop are drawn
    from a generator seeded by (seed, epoch, index) (``keyed``: see train.resumable).
    """

    keyed = True

    def __init__(self, clips: ShardDataset, cfg: DataConfig, temporal_stride: int, seed: int = 0):
        self.clips, self.cfg, self.stride, self.seed = clips, cfg, temporal_stride, seed
        self.window_frames = num_frames(cfg.num_latents, temporal_stride)
        short = [i for i, f in enumerate(clips.frame_counts) if f < self.window_frames]
        if len(short) == len(clips):
            raise ValueError(
                f"{clips.root}: every clip is shorter than a window of {cfg.num_latents} latents "
                f"({self.window_frames} frames at temporal stride {temporal_stride}); longest clip has "
                f"{max(clips.frame_counts)} frames"
            )
        self.valid = [i for i in range(len(clips)) if clips.frame_counts[i] >= self.window_frames]
        self.thresholds = MotionThresholds(translation=cfg.translation_threshold, rotation_deg=cfg.rotation_threshold_deg)

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rng = np.random.default_rng(_seed_for(self.seed, epoch, index))
        clip = self.clips[self.valid[index]]
        return make_window(clip, self.cfg, self.stride, rng, self.thresholds)


class MixtureDataset(Dataset):
    """Keyed dataset of windows drawn from several shard datasets in proportion to their weights.

    ``len`` is the number of usable clips over all sources (one epoch visits that many keys). Key
    (epoch, index) picks source ``s`` with probability ``weights[s] / sum(weights)``, a clip of
    ``s`` uniformly among those long enough for a window, then the window, from one generator
    seeded by (seed, epoch, index).
    """

    keyed = True

    def __init__(self, sources: list[ShardDataset], weights: list[float], cfg: DataConfig, temporal_stride: int,
                 seed: int = 0, names: list[str] | None = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"data.mixture: need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        names = names or [f"data.mixture[{i}] ({s.root})" for i, s in enumerate(sources)]
        self.sources, self.cfg, self.stride, self.seed = sources, cfg, temporal_stride, seed
        self.window_frames = num_frames(cfg.num_latents, temporal_stride)
        self.valid: list[list[int]] = []
        for name, src in zip(names, sources):
            ok = [i for i, f in enumerate(src.frame_counts) if f >= self.window_frames]
            if not ok:
                raise ValueError(
                    f"{name}: every clip is shorter than a window of {cfg.num_latents} latents ({self.window_frames} frames "
                    f"at temporal stride {temporal_stride}); longest clip has {max(src.frame_counts, default=0)} frames"
                )
            self.valid.append(ok)
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.thresholds = MotionThresholds(translation=cfg.translation_threshold, rotation_deg=cfg.rotation_threshold_deg)

    def __len__(self) -> int:
        return sum(len(v) for v in self.valid)

    def _draw(self, key: tuple[int, int]) -> tuple[np.random.Generator, int, int]:
        epoch, index = key
        rng = np.random.default_rng(_seed_for(self.seed, epoch, index))
        s = int(rng.choice(len(self.sources), p=self.probs))
        clip = self.valid[s][int(rng.integers(0, len(self.valid[s])))]
        return rng, s, clip

    def locate(self, key: tuple[int, int]) -> tuple[int, int]:
        """(source number, clip index within that source) that key (epoch, index) draws."""
        _, s, clip = self._draw(key)
        return s, clip

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        rng, s, clip = self._draw(key)
        return make_window(self.sources[s][clip], self.cfg, self.stride, rng, self.thresholds)


def mixture_entries(cfg: DataConfig) -> list[MixtureSource]:
    """``cfg.mixture`` as checked MixtureSource entries (dicts accepted); errors name the entry."""
    out = []
    for i, e in enumerate(cfg.mixture):
        if isinstance(e, MixtureSource):
            path, weight = e.path, e.weight
        elif hasattr(e, "keys"):
            unknown = sorted(set(e.keys()) - {"path", "weight"})
            if unknown:
                raise ValueError(f"data.mixture[{i}]: unknown key {unknown[0]!r}; an entry is {{path: DIR, weight: W}}")
            path, weight = e.get("path", ""), e.get("weight", 1.0)
        else:
            raise ValueError(f"data.mixture[{i}]: expected {{path: DIR, weight: W}}, got {e!r}")
        where = f"data.mixture[{i}] ({path!r})"
        if not path:
            raise ValueError(f"data.mixture[{i}]: 'path' is missing")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: weight must be a number, got {weight!r}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}: weight must be a positive finite number, got {weight}")
        if not (Path(path) / "index.json").is_file():
            what = "does not exist" if not Path(path).exists() else "has no index.json (not a shard dataset)"
            raise ValueError(f"{where}: path {what}")
        out.append(MixtureSource(path=str(path), weight=weight))
    return out


def check_data_exists(cfg: DataConfig) -> None:
    """Raise FileNotFoundError naming ``data.path`` and how to make it when it is not a dataset directory.

    Mixture entries are checked by :func:`mixture_entries`. Called by the training entry point
    before it creates a run directory, and by :func:`build_dataset`.
    """
    if cfg.mixture:
        mixture_entries(cfg)
        return
    if not cfg.path:
        raise ValueError("data.path is not set: give a dataset directory (data.path=DIR) or a mixture (data.mixture=[{path: DIR, weight: W}, ...])")
    path = Path(cfg.path)
    if (path / "index.json").is_file():
        return
    what = "does not exist" if not path.exists() else "has no index.json (not a shard dataset, or an import that did not finish)"
    how = (f"make it with: {cfg.make_command.replace('{path}', str(cfg.path))}" if cfg.make_command else
           "write one with a data command (python -m data.synthetic, data.vizdoom, data.import_folder, data.custom: "
           "README 'Data') or point data.path at one")
    raise FileNotFoundError(f"data.path={cfg.path}: the dataset directory {what}; {how}")


def build_dataset(cfg: DataConfig, temporal_stride: int, seed: int) -> WindowDataset | MixtureDataset:
    """The keyed window dataset of ``cfg``: a mixture when ``cfg.mixture`` is set, else ``cfg.path``."""
    if cfg.mixture:
        entries = mixture_entries(cfg)
        names = [f"data.mixture[{i}] ({e.path!r})" for i, e in enumerate(entries)]
        return MixtureDataset([ShardDataset(e.path) for e in entries], [e.weight for e in entries], cfg, temporal_stride, seed, names)
    check_data_exists(cfg)
    return WindowDataset(ShardDataset(cfg.path), cfg, temporal_stride, seed)


def make_window(clip: dict, cfg: DataConfig, stride: int, rng: np.random.Generator, thresholds: MotionThresholds) -> dict[str, Any]:
    """Cut one training window from a contract clip; see the module docstring for the layout.

    Returns video float32 [3, F, H, W] in [-1, 1], c2w/w2c float32 [T, 4, 4], K float32 [T, 3, 3]
    (normalised), K_pixels [T, 3, 3], actions int64 [T], caption str, key str.
    """
    if clip.get("latents") is not None:
        from train.latent_windows import make_latent_window  # precomputed latents (python -m data.precompute)

        return make_latent_window(clip, cfg, rng, thresholds)
    F_win = num_frames(cfg.num_latents, stride)
    F = clip["video"].shape[0]
    start = 0 if cfg.window == "start" else int(rng.integers(0, F - F_win + 1))
    sl = slice(start, start + F_win)
    video, K = crop_resize(np.asarray(clip["video"][sl]), np.asarray(clip["K"][sl]), cfg.height, cfg.width, rng if cfg.crop == "random" else None)
    K = K.numpy()
    c2w_frames = rebase_to_first(torch.as_tensor(np.asarray(clip["c2w"][sl]), dtype=torch.float64))
    idx = latent_frame_index(F_win, stride)
    c2w = c2w_frames[idx]
    if cfg.action_source == "keys":
        actions = keys_to_action_id(latent_keys_from_frames(torch.as_tensor(np.asarray(clip["keys"][sl])), stride))
    elif cfg.action_source == "poses":
        actions = latent_action_ids(c2w, thresholds)
    else:
        raise ValueError(f"data.action_source must be 'poses' or 'keys', got {cfg.action_source!r}")
    K_lat = torch.as_tensor(K[idx.numpy()], dtype=torch.float64)
    return {
        "video": torch.from_numpy(video).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0),
        "c2w": c2w.float(),
        "w2c": invert_rigid(c2w).float(),
        "K": normalize_intrinsics(K_lat, cfg.width, cfg.height).float(),
        "K_pixels": K_lat.float(),
        "actions": actions.long(),
        "caption": clip.get("caption", ""),
        "key": str(clip.get("__key__", "")),
    }


def collate_windows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def build_train_loader(cfg: DataConfig, temporal_stride: int, seed: int, rank: int = 0, world: int = 1) -> ResumableLoader:
    """The loader every stage uses: shard dataset -> windows -> resumable, rank-sharded batches."""
    windows = build_dataset(cfg, temporal_stride, seed)
    if len(windows) < cfg.batch_size * world:
        where = "data.mixture" if cfg.mixture else cfg.path
        raise ValueError(
            f"{where}: {len(windows)} usable windows cannot fill one global batch of data.batch_size={cfg.batch_size} "
            f"x {world} rank(s); lower the batch size or add clips"
        )
    return ResumableLoader(
        windows, cfg.batch_size, seed=seed, rank=rank, world_size=world, shuffle=cfg.shuffle,
        collate_fn=collate_windows, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
    )


def tokens_per_sample(cfg: DataConfig, spatial_stride: int, patch: list[int] | tuple[int, ...] = (1, 1, 1)) -> int:
    """Video tokens the DiT sees per window (for tokens/s reporting)."""
    return cfg.num_latents // patch[0] * math.ceil(cfg.height / spatial_stride / patch[1]) * math.ceil(cfg.width / spatial_stride / patch[2])


__all__ = ["DataConfig", "MixtureSource", "WindowDataset", "MixtureDataset", "mixture_entries", "check_data_exists", "build_dataset", "build_train_loader", "make_window", "collate_windows", "tokens_per_sample"]
