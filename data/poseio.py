"""WorldPlay trajectory formats: the per-latent pose JSON and pose strings.

- Pose JSON: ``{"0": {"extrinsic": c2w 4x4, "K": 3x3 pixels}, "1": ..., "N": ...}``, one entry per
  latent, entry 0 the identity (WorldPlay's `assets/pose/*.json`).
- Pose string: ``"w-3, right-1, d-4"``: comma-separated moves, each ``NAME-COUNT`` where COUNT is
  a number of latents. Names: w/s/a/d translate, up/down/left/right rotate; ``+`` combines moves
  held together (``"w+right-4"``). The trajectory has ``1 + sum(COUNT)`` latents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from data.actions import NUM_KEYS, MotionSteps, keys_to_poses
from data.geometry import is_rigid

MOVE_KEYS = {"w": 0, "s": 1, "d": 2, "a": 3, "right": 4, "left": 5, "up": 6, "down": 7}
_MOVE_RE = re.compile(r"^\s*([a-z+]+)\s*-\s*(\d+)\s*$")


def parse_pose_string(text: str) -> Tensor:
    """Per-latent held keys [1 + sum(counts), 8] for a pose string; latent 0 holds nothing."""
    rows = [torch.zeros(NUM_KEYS, dtype=torch.bool)]
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _MOVE_RE.match(part.lower())
        if not m:
            raise ValueError(f"pose string {text!r}: cannot parse move {part!r}; expected NAME-COUNT like 'w-3' or 'w+left-2'")
        names, count = m.group(1).split("+"), int(m.group(2))
        row = torch.zeros(NUM_KEYS, dtype=torch.bool)
        for name in names:
            if name not in MOVE_KEYS:
                raise ValueError(f"pose string {text!r}: unknown move {name!r}; known: {sorted(MOVE_KEYS)}")
            row[MOVE_KEYS[name]] = True
        rows.extend([row] * count)
    if len(rows) == 1:
        raise ValueError(f"pose string {text!r} contains no moves")
    return torch.stack(rows)


def pose_string_to_poses(text: str, steps: MotionSteps = MotionSteps()) -> tuple[Tensor, Tensor]:
    """(keys [T, 8], c2w [T, 4, 4] float64) for a pose string, integrated with per-latent ``steps``."""
    keys = parse_pose_string(text)
    return keys, keys_to_poses(keys, steps)


def read_pose_json(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read a WorldPlay pose JSON: (c2w [T, 4, 4], K [T, 3, 3] pixels), both float64."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable pose JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected an object with keys '0'..'N'")
    n = len(raw)
    if sorted(raw, key=lambda k: int(k) if str(k).isdigit() else -1) != [str(i) for i in range(n)]:
        raise ValueError(f"{path}: keys must be '0'..'{n - 1}' with none missing, got {sorted(raw)[:8]}...")
    c2w, K = [], []
    for i in range(n):
        entry = raw[str(i)]
        for key, shape in (("extrinsic", (4, 4)), ("K", (3, 3))):
            if key not in entry:
                raise ValueError(f"{path}: entry '{i}' lacks key '{key}'")
            t = torch.tensor(entry[key], dtype=torch.float64)
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: entry '{i}' key '{key}' has shape {tuple(t.shape)}, expected {shape}")
        c2w.append(torch.tensor(entry["extrinsic"], dtype=torch.float64))
        K.append(torch.tensor(entry["K"], dtype=torch.float64))
    c2w_t, K_t = torch.stack(c2w), torch.stack(K)
    bad = (~is_rigid(c2w_t)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{path}: entry '{int(bad[0])}' key 'extrinsic' is not a rigid transform")
    return c2w_t, K_t


def write_pose_json(path: str | Path, c2w: Tensor, K: Tensor) -> None:
    """Write per-latent poses c2w [T, 4, 4] and pixel intrinsics K [T, 3, 3] (or [3, 3]) as WorldPlay JSON."""
    if K.ndim == 2:
        K = K.expand(c2w.shape[0], 3, 3)
    out = {str(i): {"extrinsic": c2w[i].double().tolist(), "K": K[i].double().tolist()} for i in range(c2w.shape[0])}
    Path(path).write_text(json.dumps(out, indent=1))
