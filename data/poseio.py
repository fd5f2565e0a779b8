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
OPPOSITE_MOVES = (("w", "s"), ("a", "d"), ("left", "right"), ("up", "down"))  # held together they cancel


class EntryKeyError(ValueError):
    """A per-frame / per-latent JSON object whose keys are not consecutive integers; names the key."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"key {key!r}: {problem}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise EntryKeyError(k, "appears twice in one JSON object")
        out[k] = v
    return out


def load_json_strict(text: str) -> object:
    """``json.loads`` that refuses an object with a repeated key (``json`` keeps the last one silently).

    Raises :class:`EntryKeyError` naming the key, or ``json.JSONDecodeError``.
    """
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def indexed_entries(raw: object, *, first: int | None = None) -> list:
    """The entries of a per-frame (or per-latent) JSON in index order.

    A list is taken as it is. An object must be keyed by integers (``{"0": ..., "1": ..., "10": ...}``)
    and is read by key, never in the file's order (sorted keys put "10" before "2"); the keys must
    be consecutive, starting at ``first`` (any start when None), with no gaps or repeats ("1" and
    "01"). Raises :class:`EntryKeyError` naming the offending key; ValueError for anything else.
    """
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"expected a list or an object keyed by frame number, got {type(raw).__name__}")
    numbers: dict[int, str] = {}
    for key in raw:
        text = str(key).strip()
        if not (text.isdigit() or (text.startswith("-") and text[1:].isdigit())):
            raise EntryKeyError(str(key), "is not an integer index (keys must be frame numbers '0', '1', ...)")
        n = int(text)
        if n in numbers:
            raise EntryKeyError(str(key), f"repeats index {n} (also key {numbers[n]!r})")
        numbers[n] = str(key)
    if not numbers:
        return []
    lo = min(numbers) if first is None else first
    if first is not None and min(numbers) != first:
        raise EntryKeyError(numbers[min(numbers)], f"indices must start at {first}, the smallest is {min(numbers)}")
    missing = sorted(set(range(lo, max(numbers) + 1)) - set(numbers))
    if missing:
        raise EntryKeyError(str(missing[0]), f"missing: keys must run {lo}..{max(numbers)} without gaps; "
                            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return [raw[numbers[n]] for n in range(lo, lo + len(numbers))]
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
        for a, b in OPPOSITE_MOVES:
            if a in names and b in names:
                raise ValueError(f"pose string {text!r}: move {part.strip()!r} holds {a!r} and {b!r} together, which cancel "
                                 f"(no motion on that axis); hold one of them, or write the move without both")
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
        raw = load_json_strict(path.read_text())
    except EntryKeyError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable pose JSON ({e})") from e
    expected = "expected WorldPlay's per-latent pose JSON, an object {\"0\": {\"extrinsic\": c2w 4x4, \"K\": 3x3 pixels}, \"1\": ...}"
    first = (raw[0] if isinstance(raw, list) and raw else next(iter(raw.values()), None) if isinstance(raw, dict) else None)
    if isinstance(first, dict) and ("w2c" in first or "c2w" in first) and "extrinsic" not in first:
        raise ValueError(f"{path}: {expected}; this file has per-frame training entries with keys {sorted(first)} "
                         "(import such files with python -m data.import_folder or data.custom; infer takes per-latent c2w 'extrinsic')")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: {expected}, got {'an empty object' if isinstance(raw, dict) else type(raw).__name__}")
    try:
        entries = indexed_entries(raw, first=0)
    except EntryKeyError as e:
        raise ValueError(f"{path}: {e}") from None
    c2w, K = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry '{i}' is not an object with 'extrinsic' and 'K'")
        for key, shape in (("extrinsic", (4, 4)), ("K", (3, 3))):
            if key not in entry:
                raise ValueError(f"{path}: entry '{i}' lacks key '{key}' (entries need 'extrinsic' and 'K'; it has {sorted(entry)})")
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
