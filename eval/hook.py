"""A small evaluation for the trainer: the protocols on a few held-out clips, as flat scalar metrics.

Called from a training stage's ``sample`` hook every N steps (on the main rank, with the EMA
weights), it runs the same code as ``python -m eval`` on an in-memory model, so numbers logged
during training and numbers in reports mean the same thing::

    metrics = evaluate_model(model, autoencoder, stage.bundle_sampling(), cfg.eval.data, num=4, seed=0)
    # {"eval/short/psnr": 17.3, "eval/short/ssim": 0.52, "eval/short/R_dist_deg": 4.1, ...}
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from eval.lpips import LPIPS
from eval.protocols import ProtocolConfig, VideoModel, evaluate, load_clips, parse_protocols, prepare_clips
from eval.protocols.runner import settings_from_sampling
from models.rollout import RolloutConfig

__all__ = ["evaluate_model"]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate_model(
    model: nn.Module,
    autoencoder: nn.Module,
    sampling_cfg: Union[Mapping[str, Any], RolloutConfig],
    data_dir: Union[str, os.PathLike],
    num: int = 4,
    seed: int = 0,
    *,
    protocols: Union[str, Sequence[str]] = ("short",),
    text_encoder: Optional[nn.Module] = None,
    config: Optional[ProtocolConfig] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    train_latents: Optional[int] = None,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    name: str = "model",
) -> dict[str, float]:
    """Evaluate ``model`` on the first ``num`` clips of ``data_dir``: {"eval/<protocol>/<metric>": value}.

    sampling_cfg: a bundle-style sampling mapping (``FlowStage.bundle_sampling()``: RolloutConfig
    fields plus height/width/...) or a RolloutConfig; without a recorded size, ``height``/``width``
    or else the clips' own size is used. ``config`` sets protocol lengths and steps (``num``/``seed``
    override it); the model runs on its own device. With ``out_dir`` a full report is written there.
    Values are floats; NaN where a metric could not be computed (report.json says why).
    """
    device = _device_of(model)
    cfg = replace(config or ProtocolConfig(), num=int(num), seed=int(seed), device=str(device))
    cfg.validate()
    names = parse_protocols(protocols)
    raw = load_clips(data_dir, cfg.num)
    has_size = isinstance(sampling_cfg, Mapping) and sampling_cfg.get("height") and sampling_cfg.get("width")
    if height is None and width is None and not has_size:
        height, width = (int(v) for v in raw[0][1]["video"].shape[1:3])
    settings = settings_from_sampling(sampling_cfg, "evaluate_model", height=height, width=width, steps=cfg.steps,
                                      train_latents=train_latents)
    vm = VideoModel(model, autoencoder, settings, text_encoder=text_encoder, device=device, name=name)
    clips = prepare_clips(raw, vm, cfg)
    lpips = LPIPS(cfg.lpips).to(device)
    results = evaluate(vm, clips, names, cfg, lpips)
    if out_dir is not None:
        from dataclasses import asdict

        from eval.report import BundleReport, write_report

        write_report(out_dir, [BundleReport(name, "<in memory>", results, {}, settings.to_dict())],
                     config=asdict(cfg), lpips_status=lpips.status(), lpips_available=lpips.available,
                     data=str(Path(data_dir).resolve()), strip_frames=cfg.strip_frames)
    out: dict[str, float] = {}
    for proto, res in results.items():
        for key, value in res.summary.items():
            out[f"eval/{proto}/{key}"] = float(value) if value is not None else math.nan
    return out
