"""The JSON sidecar next to each generated mp4, and the atomic write of both.

The sidecar records what the model was actually conditioned on (per latent: c2w, normalised K,
action id, implied keys; per frame: its latent, action id and pose), every setting, the inputs and
the timings. Frames share the conditioning of the latent that holds them (a latent's pose is the
pose of the last frame of its group, the rule of ``data.latents``).

Both files are written under hidden temporary names in the target directory and renamed into
place only when both are complete, so a failure never leaves a partial mp4 or sidecar.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data.actions import KEY_NAMES
from data.latents import latent_groups
from data.video import write_mp4
from infer.player import WorldPlayer
from infer.trajectory import Trajectory

__all__ = ["FORMAT", "build_sidecar", "write_outputs", "sidecar_path_for"]

FORMAT = "worldsmith.infer.v1"


def sidecar_path_for(out: Path) -> Path:
    """``OUT.json`` next to ``OUT.mp4``."""
    return out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")


def _jsonable(x: Any) -> Any:
    """Plain JSON values: NaN/inf become null, tuples lists, numpy/torch scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build_sidecar(
    player: WorldPlayer,
    *,
    out: Path,
    image: Optional[str] = None,
    trajectory: Optional[Trajectory] = None,
) -> dict[str, Any]:
    """The sidecar dict of the player's current video (call after the last step)."""
    cond = player.conditioning()
    N, F, fps = player.num_latents, player.num_frames, player.fps
    groups = latent_groups(F, player.temporal_stride) if N else []
    frame_latent = [i for i, g in enumerate(groups) for _ in g]
    c2w = cond["c2w"].tolist()
    actions = cond["actions"].tolist()
    meta = player.bundle.meta
    return _jsonable({
        "format": FORMAT,
        "video": {"path": out.name, "frames": F, "latents": N, "chunks": len(player.chunk_timings), "fps": fps,
                  "height": player.height, "width": player.width, "duration_s": F / fps},
        "bundle": {"path": str(player.bundle.path), **{k: meta.get(k) for k in ("stage", "step", "parent", "config_hash", "code_version")}},
        "inputs": {"image": image, "pose": None if trajectory is None else trajectory.spec,
                   "pose_source": None if trajectory is None else trajectory.source},
        "settings": player.settings(),
        "timings": player.timings(),
        "latents": [
            {"index": i, "frames": [g.start, g.stop - 1], "c2w": c2w[i], "K": cond["K"][i].tolist(), "action_id": actions[i],
             "keys": [name for name, held in zip(KEY_NAMES, cond["keys"][i].tolist()) if held]}
            for i, g in enumerate(groups)
        ],
        "frames": {"latent": frame_latent, "action_id": [actions[i] for i in frame_latent],
                   "c2w": [c2w[i] for i in frame_latent]},
    })


def write_outputs(out: Path, frames: np.ndarray, fps: float, sidecar: dict[str, Any], sidecar_path: Optional[Path] = None) -> Path:
    """Write ``out`` (H.264 mp4) and its sidecar atomically; returns the sidecar path.

    Adds ``timings.mp4_write_s`` (encoding time) to the sidecar. On any failure both temporaries are
    removed and no output file is created (an existing file of the same name is left as it was).
    """
    out = Path(out)
    side = Path(sidecar_path) if sidecar_path is not None else sidecar_path_for(out)
    if out.resolve() == side.resolve():
        raise ValueError(f"the video and its sidecar would both be {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    side.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp_mp4 = out.parent / f".{out.name}.tmp-{tag}.mp4"
    tmp_json = side.parent / f".{side.name}.tmp-{tag}.json"
    replaced = False
    try:
        t0 = time.perf_counter()
        write_mp4(tmp_mp4, frames, fps=fps)
        sidecar.setdefault("timings", {})["mp4_write_s"] = time.perf_counter() - t0
        tmp_json.write_text(json.dumps(_jsonable(sidecar), indent=1) + "\n")
        os.replace(tmp_mp4, out)
        replaced = True
        os.replace(tmp_json, side)
    except BaseException:
        for p in (tmp_mp4, tmp_json) + ((out,) if replaced else ()):
            p.unlink(missing_ok=True)
        raise
    return side
