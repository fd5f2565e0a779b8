"""ODE pairs for the student's initialisation: an AR model's own sampling trajectories at the student's levels.

The AR multi-step model (Causal Forcing: initialise a causal student from a causal teacher) rolls out
``chunks`` chunks through the inference sampler (``models.rollout.Rollout``: its memory, KV cache,
Euler ODE steps) after a real-video prefix, recording each chunk's trajectory. For every student level
σ* (the 4-step distilled schedule 1, .9375, .8333, .625) the state on the Euler path is stored:
between the sampler's grid points σ_k ≥ σ* > σ_{k+1} the Euler path is the straight segment
x(σ*) = x_k + (σ* − σ_k)·v_k, so a level need not lie on the teacher's grid. The target of chunk i is
its final clean output, which is also what later chunks attended to as history.

Storage: ``<dir>/manifest.json`` (what the pairs are: levels, chunk layout, the teacher, the sampler
config, the seed) and ``<dir>/shard_NNNNNN.pt``, one per generation batch of ``rollouts_per_shard``
rollouts (one training batch). A shard is written to a temporary file and renamed, so a directory
holds only complete shards; generation skips the shards that exist, so an interrupted run resumes,
and shard s depends only on (seed, s), so a resumed directory equals an uninterrupted one. Ranks
generate disjoint shards. Shard keys::

    latents   float32 [G, C, N, h, w]   history: real prefix, then the teacher's chunks (targets)
    actions   int64   [G, N]; w2c [G, N, 4, 4]; K [G, N, 3, 3]
    history   int     real-prefix latents (a multiple of chunk_size)
    levels    float32 [S]
    states    [G, n, S, C, L, h, w]     the trajectory at each level, per chunk (pair_dtype)
    context_idx / context_pos  list of n int64 [G, M_i]; positions: list of n int64 [G, L]
    caption   list of G str
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from models.rollout import Rollout, Trajectory

__all__ = ["PairSpec", "trajectory_levels", "generate_pairs", "PairShards", "first_item", "shard_path"]

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class PairSpec:
    """What a pair directory holds; two specs that differ in an identity field cannot share a directory."""

    num_shards: int
    rollouts_per_shard: int
    chunks: int
    chunk_size: int
    max_history: int  # real-prefix latents drawn from U{0..max} in whole chunks
    num_latents: int  # data window the rollouts are cut from
    levels: list[float]
    seed: int
    dtype: str = "float16"
    rollout: dict[str, Any] = field(default_factory=dict)  # the teacher's RolloutConfig (asdict)
    teacher: dict[str, Any] = field(default_factory=dict)  # lineage of the teacher bundle
    data: str = ""

    IDENTITY = ("rollouts_per_shard", "chunks", "chunk_size", "max_history", "num_latents", "levels", "seed", "dtype", "rollout", "data")


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:06d}.pt"


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def trajectory_levels(traj: Trajectory, levels: Sequence[float]) -> Tensor:
    """States [S, B, C, L, h, w] of a chunk's Euler path at the noise levels ``levels`` (each in (0, σ_0]).

    traj: a whole trajectory (x_k, v_k at σ_k for every model call k, from ``Rollout.step(return_trajectory=True)``
    with the ``euler`` schedule, no early exit). The path between σ_k and σ_{k+1} is x_k + (σ − σ_k)·v_k.
    """
    sig = traj.sigma.double().cpu()
    n = sig.shape[0]
    out = []
    for level in levels:
        if not 0.0 < level <= float(sig[0]) + 1e-6:
            raise ValueError(f"trajectory_levels: level {level} is outside the trajectory's (0, {float(sig[0])}]")
        k = int((sig >= level - 1e-6).nonzero().max())  # the last call at or above the level
        k = min(k, n - 1)
        step = float(level) - float(sig[k])
        out.append(traj.x[k] if abs(step) < 1e-7 else traj.x[k] + step * traj.v[k])
    return torch.stack(out)


def _write_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_manifest(directory: Path, spec: PairSpec) -> None:
    """Write the manifest, or check an existing one describes the same pairs (num_shards may grow)."""
    path = directory / MANIFEST
    mine = {"format": FORMAT, **asdict(spec)}
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in PairSpec.IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(mine[k], sort_keys=True)]
        if old.get("format") != FORMAT or diff:
            raise ValueError(f"ode pairs {directory}: the existing pairs were made with different {diff or ['format']} "
                             f"({ {k: old.get(k) for k in diff} } vs { {k: mine[k] for k in diff} }); use another stage.pairs_dir "
                             "or delete that directory")
        if old["num_shards"] >= spec.num_shards:
            return
    from train.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(mine, indent=1))


@torch.no_grad()
def generate_pairs(
    directory: str | Path,
    spec: PairSpec,
    rollout: Rollout,
    dataset: Dataset,
    encode: Callable[[dict[str, Any]], Tensor],
    text: Callable[[list[str]], tuple[Optional[Tensor], Optional[Tensor]]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate the missing shards of ``directory`` that belong to this rank (s % world_size == rank).

    rollout: the teacher's sampler (``euler`` schedule, no re-noising: its own ODE); dataset: keyed windows
    of real clips (``train.data.WindowDataset``); encode: batch -> latents [G, C, T, h, w] on ``device``;
    text: captions -> (tokens, mask) or (None, None); collate: list of windows -> batch.
    """
    if rollout.cfg.use_renoise or rollout.cfg.mode != "ar":
        raise ValueError("generate_pairs: the teacher must sample its ODE (ar mode, euler schedule, renoise off)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _check_manifest(directory, spec)
    G, C, n = spec.rollouts_per_shard, spec.chunk_size, spec.chunks
    dtype = getattr(torch, spec.dtype)
    todo = [s for s in range(rank, spec.num_shards, world_size) if not shard_path(directory, s).exists()]
    if todo:
        log(f"[ode_init] rank {rank}: generating {len(todo)} shard(s) of {G} rollouts x {n} chunks in {directory}")
    keyed = getattr(dataset, "keyed", False)
    size = len(dataset)  # type: ignore[arg-type]
    for s in todo:
        plan = torch.Generator().manual_seed(_seed(spec.seed, s, 0))
        history = C * int(torch.randint(spec.max_history // C + 1, (), generator=plan))
        keys = [s * G + r for r in range(G)]
        items = [dataset[(k // size, k % size) if keyed else k % size] for k in keys]  # type: ignore[index]
        batch = collate(items)
        x0 = encode(batch)
        T = x0.shape[2]
        end = history + n * C
        if T < end:
            raise ValueError(f"ode pairs: data windows of {T} latents cannot hold a {history}-latent prefix and {n} chunks of {C}; "
                             f"raise data.num_latents to {spec.max_history + n * C} or lower stage.max_history_latents")
        cond = {k: batch[k].to(device) for k in ("actions", "w2c", "K")}
        tokens, mask = text(list(batch["caption"]))
        state = rollout.start(x0[:, :, 0], tokens, mask)
        if history:
            rollout.extend(state, x0[:, :, :history], cond["actions"][:, :history], cond["w2c"][:, :history], cond["K"][:, :history])
        noise = torch.Generator(device=device).manual_seed(_seed(spec.seed, s, 1))
        states, ctx_idx, ctx_pos, positions = [], [], [], []
        for i in range(n):
            sl = slice(history + i * C, history + (i + 1) * C)
            rec = rollout.step(state, cond["actions"][:, sl], cond["w2c"][:, sl], cond["K"][:, sl], noise, return_trajectory=True)
            states.append(trajectory_levels(rec.trajectory, spec.levels).transpose(0, 1).to(dtype).cpu())  # [G, S, C, L, h, w]
            ctx_idx.append(rec.context_idx.cpu())
            ctx_pos.append(rec.context_pos.cpu())
            positions.append(rec.positions.cpu())
        shard = {
            "latents": state.latents[:, :, :end].float().cpu(),
            "actions": state.actions[:, :end].cpu(),
            "w2c": state.w2c[:, :end].float().cpu(),
            "K": state.K[:, :end].float().cpu(),
            "history": history,
            "levels": torch.tensor(spec.levels, dtype=torch.float32),
            "states": torch.stack(states, dim=1),
            "context_idx": ctx_idx,
            "context_pos": ctx_pos,
            "positions": positions,
            "caption": [str(c) for c in batch["caption"]],
        }
        _write_atomic(shard, shard_path(directory, s))
    return directory


class PairShards(Dataset):
    """The shards of a pair directory as a dataset (one item = one shard = one training batch).

    Holds loaded shards in memory while their files total at most ``cache_bytes``.
    """

    def __init__(self, directory: str | Path, num_shards: Optional[int] = None, cache_bytes: int = 4 << 30):
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"ode pairs {self.directory}: no {MANIFEST} (generate the pairs first: stage=ode_init)")
        self.manifest = json.loads(manifest.read_text())
        n = int(self.manifest["num_shards"]) if num_shards is None else num_shards
        self.paths = [shard_path(self.directory, s) for s in range(n)]
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"ode pairs {self.directory}: {len(missing)} of {n} shards missing ({missing[:3]}...); "
                                    "run the ode_init stage again to finish generating them")
        self.cache: Optional[dict[int, dict[str, Any]]] = {} if sum(p.stat().st_size for p in self.paths) <= cache_bytes else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        try:
            item = torch.load(self.paths[index], map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"ode pairs: cannot read {self.paths[index]}: {type(e).__name__}: {e}") from None
        if self.cache is not None:
            self.cache[index] = item
        return item


def first_item(items: list[Any]) -> Any:
    """Collate for a batch size of one shard."""
    return items[0]
