"""Atomic checkpoints: save, validate, resolve ``resume``, prune.

Layout of one checkpoint (``<run>/ckpt/step_000123/``)::

    COMPLETE            marker, written last: {"step", "world_size", "format", "backend", "time"}
    trainer.pt          rank 0: step, grad-skip counters
    rank_00000.pt ...   every rank: its RNG states, data-iterator position, stage state
    dcp/                formats none/ddp/fsdp: models, optimizers, EMA (torch.distributed.checkpoint)
    deepspeed/<role>/   format deepspeed: each engine's own checkpoint; ema.pt: EMA (rank 0)

Protocol: everything is written into ``step_000123.tmp/``; after a barrier rank 0 fsyncs the tree,
writes ``COMPLETE``, renames the directory to ``step_000123/``, fsyncs the parent and replaces the
``latest`` pointer file atomically. A crash at any point leaves either no new directory or a
``.tmp`` one, both ignored; loading refuses a directory without its marker.

Resharding: DCP checkpoints (none/ddp/fsdp) load on any number of processes and across these three
backends (sharded tensors are re-split, per-rank RNG falls back to rank 0's when the world size
changed, and the data iterator's global position carries over). DeepSpeed checkpoints load with
the same data-parallel world size; to change it, convert them with DeepSpeed's universal-checkpoint
tool (``python -m deepspeed.checkpoint.ds_to_universal``) and pass
``dist.deepspeed_config={"checkpoint": {"load_universal": true}}``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from train.distributed import DistEnv, Wrapped, barrier
from train.ema import EMA

# DCP says so every time it runs without a process group (the single-process backend): expected.
_NO_PG_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

MARKER = "COMPLETE"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the problem."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# --- filesystem durability -----------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may write the same file at once
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path) -> Any:
    # Written by this trainer (stage and data states may hold arbitrary picklable objects).
    return torch.load(path, map_location="cpu", weights_only=False)


# --- finding checkpoints -------------------------------------------------------------------------


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker of checkpoint ``path``; :class:`CheckpointError` if absent or corrupt."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker; a crash during its write?)")
    try:
        data = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: corrupt completion marker ({e})") from e
    for key in ("step", "world_size", "format"):
        if key not in data:
            raise CheckpointError(f"{marker}: completion marker lacks '{key}'")
    return data


def is_complete(path: Path) -> bool:
    try:
        read_marker(path)
        return True
    except CheckpointError:
        return False


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_dir`` as (step, path), oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = []
    for p in Path(ckpt_dir).iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(ckpt_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None; ``"latest"`` (None when there is none yet); a checkpoint
    directory; or a run directory (its latest checkpoint, an error when it has none)."""
    if resume is None or resume == "":
        return None
    path = Path(resume)
    if resume != "latest" and path.is_dir() and not (path / MARKER).exists() and (path / "ckpt").is_dir():
        found = resolve_resume(path / "ckpt", "latest")
        if found is None:
            raise CheckpointError(f"checkpoint.resume={resume}: the run directory has no complete checkpoint in {path / 'ckpt'}")
        return found
    if resume == "latest":
        pointer = Path(ckpt_dir) / LATEST
        if pointer.is_file():
            target = Path(ckpt_dir) / pointer.read_text().strip()
            if is_complete(target):
                return target
            warnings.warn(f"{pointer} names {target.name}, which is not a complete checkpoint; scanning {ckpt_dir}")
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such directory")
    read_marker(path)
    return path


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temporaries."""
    found = list_checkpoints(ckpt_dir)
    removed = []
    if keep_last > 0:
        pointer = Path(ckpt_dir) / LATEST
        protected = pointer.read_text().strip() if pointer.is_file() else None
        for _, path in found[:-keep_last]:
            if path.name != protected:
                shutil.rmtree(path)
                removed.append(path)
    newest = found[-1][0] if found else -1
    for p in Path(ckpt_dir).iterdir():
        m = re.match(r"^step_(\d+)\.(tmp|old)$", p.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- model / optimizer / EMA state ---------------------------------------------------------------


def _dcp_state(roles: dict[str, Wrapped], emas: dict[str, EMA]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state: dict[str, Any] = {"model": {}, "optim": {}, "ema": {}}
    for name, w in roles.items():
        if not w.trainable:
            continue
        state["model"][name], state["optim"][name] = get_state_dict(w.raw, w.optimizer)
    for name, ema in emas.items():
        state["ema"][name] = ema.state_dict()
    return state


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    env: DistEnv,
    fmt: str,
    backend: str,
    roles: dict[str, Wrapped],
    emas: dict[str, EMA],
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it). Returns its path."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(env)

    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_PG_WARNING)
            dcp.save(_dcp_state(roles, emas), checkpoint_id=str(tmp / "dcp"))
    elif fmt == "deepspeed":
        for name, w in roles.items():
            if w.trainable:
                w.engine.save_checkpoint(str(tmp / "deepspeed" / name), tag="engine", client_state={}, save_latest=False)
        if env.is_main and emas:
            _save({name: {k: v.detach().cpu() for k, v in ema.state_dict().items()} for name, ema in emas.items()}, tmp / "ema.pt")
    else:
        raise ValueError(f"save_checkpoint: unknown format '{fmt}'")
    _save(rank_state, tmp / f"rank_{env.rank:05d}.pt")
    if env.is_main:
        _save(trainer_state, tmp / "trainer.pt")
    barrier(env)

    if env.is_main:
        _fsync_tree(tmp)
        marker = {"step": step, "world_size": env.world_size, "format": fmt, "backend": backend, "time": time.time()}
        write_text_atomic(tmp / MARKER, json.dumps(marker))
        old = ckpt_dir / (final.name + ".old")
        if final.exists():  # the same step saved again (a run resumed from an older checkpoint)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(ckpt_dir)
        write_text_atomic(ckpt_dir / LATEST, final.name)
        if old.exists():
            shutil.rmtree(old)
        prune(ckpt_dir, keep_last)
    barrier(env)
    return final


def load_checkpoint(path: Path, *, env: DistEnv, fmt: str, roles: dict[str, Wrapped], emas: dict[str, EMA]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore models, optimizers and EMA in place; return (trainer state, this rank's state)."""
    path = Path(path)
    marker = read_marker(path)
    if marker["format"] != fmt:
        raise CheckpointError(f"{path}: written in format '{marker['format']}' (backend {marker.get('backend')}), this run's backend needs '{fmt}'")
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _dcp_state(roles, emas)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_PG_WARNING)
                dcp.load(state, checkpoint_id=str(path / "dcp"))
        except (Exception, dcp.api.CheckpointException) as e:  # (a BaseException) wraps per-rank tracebacks; the last line names the key
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise CheckpointError(f"{path / 'dcp'}: cannot load into this run's roles: {lines[-1].strip()}") from e
        for name, w in roles.items():
            if w.trainable:
                set_state_dict(w.raw, w.optimizer, model_state_dict=state["model"][name], optim_state_dict=state["optim"][name])
        for name, ema in emas.items():
            ema.load_state_dict(state["ema"][name], where=f"{path / 'dcp'} ema/{name}")
    else:
        for name, w in roles.items():
            if w.trainable:
                load_path, _ = w.engine.load_checkpoint(str(path / "deepspeed" / name), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True)
                if load_path is None:
                    raise CheckpointError(f"{path / 'deepspeed' / name}: DeepSpeed found no checkpoint for role '{name}'")
        if emas:
            saved = _load(path / "ema.pt")
            for name, ema in emas.items():
                if name not in saved:
                    raise CheckpointError(f"{path / 'ema.pt'}: no EMA for role '{name}'")
                ema.load_state_dict({k: v.to(ema.shadow[k].device) for k, v in saved[name].items()}, where=f"{path / 'ema.pt'} {name}")

    trainer_state = _load(path / "trainer.pt")
    own = path / f"rank_{env.rank:05d}.pt"
    if marker["world_size"] == env.world_size and own.is_file():
        rank_state = _load(own)
    else:
        warnings.warn(f"{path}: saved with {marker['world_size']} ranks, resuming with {env.world_size}: every rank takes rank 0's data position and stage state, RNG streams are re-seeded")
        rank_state = _load(path / "rank_00000.pt")
        rank_state["rng"] = None
    return trainer_state, rank_state
