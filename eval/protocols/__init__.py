"""Evaluation protocols: ``short`` (re-generate held-out clips), ``long`` (out and back: revisit
consistency), ``action`` (follow random composite actions) and ``control`` (how much the video
depends on the commanded path: two paths from one start). Definitions: ``eval/README.md``.

    model = VideoModel.from_bundle("outputs/demo/midtrain/export/bundle")
    clips = prepare_clips(load_clips("outputs/demo/data", 8), model, ProtocolConfig())
    results = evaluate(model, clips, ["short", "long", "action"], ProtocolConfig())
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from eval.lpips import LPIPS
from eval.protocols.action import run_action
from eval.protocols.clips import EvalClip, load_clips, prepare_clip
from eval.protocols.control import run_control
from eval.protocols.config import PROTOCOLS, ProtocolConfig, WalkConfig
from eval.protocols.long import run_long
from eval.protocols.runner import EvalSettings, VideoModel, settings_from_sampling
from eval.protocols.scoring import LPIPS_MIN_SIZE, ProtocolResult
from eval.protocols.short import run_short

__all__ = [
    "PROTOCOLS",
    "EvalClip",
    "EvalSettings",
    "ProtocolConfig",
    "ProtocolResult",
    "VideoModel",
    "WalkConfig",
    "evaluate",
    "load_clips",
    "parse_protocols",
    "prepare_clips",
    "run_action",
    "run_control",
    "run_long",
    "run_short",
    "settings_from_sampling",
]

RUNNERS: dict[str, Callable[..., ProtocolResult]] = {
    "short": run_short, "long": run_long, "action": run_action, "control": run_control,
}


def parse_protocols(names: str | Sequence[str]) -> list[str]:
    """Protocol names from "all", one name, a comma-separated string or a list; unknown names raise."""
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            picked = list(PROTOCOLS) if name == "all" else [name]
            for p in picked:
                if p not in PROTOCOLS:
                    raise ValueError(f"unknown protocol {p!r}; choose from {list(PROTOCOLS)} or 'all'")
                if p not in out:
                    out.append(p)
    if not out:
        raise ValueError("no protocol given")
    return out


def prepare_clips(raw: Sequence[tuple[str, dict]], model: VideoModel, cfg: ProtocolConfig) -> list[EvalClip]:
    """Contract clips (name, dict) fitted to ``model``'s resolution, with their verified scenes."""
    return [prepare_clip(clip, name, model.settings.height, model.settings.width, cfg.scene_match_psnr) for name, clip in raw]


def evaluate(
    model: VideoModel,
    clips: Sequence[EvalClip],
    protocols: str | Sequence[str],
    cfg: Optional[ProtocolConfig] = None,
    lpips: Optional[LPIPS] = None,
) -> dict[str, ProtocolResult]:
    """Run each named protocol on ``clips``; LPIPS is built from ``cfg.lpips`` when not given."""
    cfg = cfg or ProtocolConfig()
    cfg.validate()
    names = parse_protocols(protocols)
    if not clips:
        raise ValueError("evaluate: no clips to evaluate on")
    if lpips is None:
        lpips = LPIPS(cfg.lpips).to(model.device)
    results = {name: RUNNERS[name](model, list(clips), cfg, lpips) for name in names}
    size = min(model.settings.height, model.settings.width)
    if lpips.available and size < LPIPS_MIN_SIZE:
        for r in results.values():
            if r.name != "action":
                r.notes.append(f"LPIPS not computed: frames of {size} px are below AlexNet's minimum of {LPIPS_MIN_SIZE} px")
    return results
