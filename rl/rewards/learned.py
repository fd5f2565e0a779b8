"""Learned rewards from a local path: any TorchScript module, or any model a Python factory builds from files.

Nothing is fetched at run time: the path must exist (a clear error names it otherwise), and the
Hugging Face hub is switched offline while a factory loads, so a factory that would download fails
instead. Use it for a learned pose estimator, an aesthetic or preference model (HPSv3, VideoAlign,
...) stored on disk. Two calling conventions (``per``):

- ``frame``: module(frames float [N, 3, H, W] in [0, 1]) -> [N]; the score is the mean over the chunk's
  scored latents;
- ``clip``: module(frames float [R, L, 3, H, W] in [0, 1]) -> [R].
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from rl.config import LearnedRewardConfig
from rl.rewards.base import Reward, RewardBatch, RewardResult, scored_mean

__all__ = ["LearnedReward", "load_learned"]

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_learned(cfg: LearnedRewardConfig, device: torch.device | str) -> Callable[[Tensor], Tensor]:
    """The reward model ``cfg`` names, loaded from its local path; FileNotFoundError / ValueError naming what is wrong."""
    where = f"stage.rewards.learned[{cfg.name}]"
    if not cfg.path:
        raise ValueError(f"{where}: no path given; learned rewards load from a local file or directory")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist. Learned rewards are read from local files only "
                                f"(no download at run time): put the model there, or drop '{cfg.name}' from stage.weights")
    if cfg.kind == "torchscript":
        file = path / cfg.file if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{where}: {file} is missing (kind torchscript reads a TorchScript file; set stage.rewards.learned[].file)")
        try:
            module = torch.jit.load(str(file), map_location=device)
        except Exception as e:  # torch raises RuntimeError / ValueError for files that are not TorchScript archives
            raise ValueError(f"{where}: {file} is not a TorchScript module: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        return module.eval()
    if ":" not in cfg.target:
        raise ValueError(f"{where}: kind callable needs target='package.module:function', got {cfg.target!r}")
    mod, fn = cfg.target.split(":", 1)
    with _offline():
        factory = getattr(importlib.import_module(mod), fn)
        model: Any = factory(str(path), torch.device(device))
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    if not callable(model):
        raise TypeError(f"{where}: {cfg.target} returned {type(model).__name__}, not a callable reward model")
    return model


class LearnedReward(Reward):
    scores: tuple[str, ...] = ()

    def __init__(self, cfg: LearnedRewardConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.name = cfg.name
        self.scores = (cfg.name,)
        self.model = load_learned(cfg, self.device)

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> RewardResult:
        R, L = batch.rows, batch.length
        x = batch.frames.to(self.device).float().div(255.0).permute(0, 1, 4, 2, 3)  # [R, L, 3, H, W]
        n = self.cfg.batch_size
        if self.cfg.per == "clip":
            out = torch.cat([torch.as_tensor(self.model(x[i:i + n])).reshape(-1).float().cpu() for i in range(0, R, n)])
            if out.shape != (R,):
                raise ValueError(f"learned reward {self.name}: expected [{R}] clip scores, got {tuple(out.shape)}")
            return RewardResult({self.name: out.double()})
        flat = x.reshape(R * L, *x.shape[2:])
        out = torch.cat([torch.as_tensor(self.model(flat[i:i + n])).reshape(-1).float().cpu() for i in range(0, R * L, n)])
        if out.shape != (R * L,):
            raise ValueError(f"learned reward {self.name}: expected [{R * L}] frame scores, got {tuple(out.shape)}")
        return RewardResult({self.name: scored_mean(out.reshape(R, L), batch.scored)})
