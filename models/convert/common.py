"""What every converter shares: strict key consumption, safetensors reading, shape checks, bundle writing.

A conversion is a list of :class:`Rule` s, each mapping one WorldDiT parameter to one or more source
parameters (a rename, a concatenation of q/k/v, a reshape of a 1x1x1 convolution). :func:`apply_rules`
runs them in either direction through a :class:`StateReader`, which hands out each source key exactly
once and checks its shape, so that a missing key, a wrong shape and a key nothing consumed each raise a
:class:`ConversionError` that names the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, MutableMapping, Optional, Sequence, Union

import torch
from torch import Tensor

from models.config import WorldDiTConfig

PathLike = Union[str, os.PathLike]

__all__ = [
    "ConversionError",
    "StateReader",
    "Rule",
    "apply_rules",
    "expected_shapes",
    "LazyState",
    "open_safetensors",
    "cast_state",
    "write_bundle",
]


class ConversionError(ValueError):
    """A checkpoint that does not convert: the message names the file, the key and the shapes."""


class LazyState(Mapping[str, Tensor]):
    """Read-only ``key -> tensor`` over one or more safetensors files, read key by key (no full copy in memory)."""

    def __init__(self, files: Sequence[PathLike]):
        from safetensors import safe_open

        if not files:
            raise ConversionError("no safetensors files to read")
        self.files = [Path(f) for f in files]
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in self.files:
            if not f.is_file():
                raise ConversionError(f"{f}: no such file")
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error type for a damaged header
                raise ConversionError(f"{f}: not a readable safetensors file: {e}") from None
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise ConversionError(f"{f}: key '{k}' also appears in another shard")
                self._where[k] = h

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"LazyState({', '.join(str(f) for f in self.files)})"


def open_safetensors(path: PathLike, prefix: str = "diffusion_pytorch_model") -> LazyState:
    """A checkpoint file, or a directory's ``{prefix}*.safetensors`` shards (an index json, when present, must agree)."""
    path = Path(path)
    if path.is_file():
        return LazyState([path])
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    files = sorted(path.glob(f"{prefix}*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no {prefix}*.safetensors (nor any .safetensors) file")
    state = LazyState(files)
    index = path / f"{prefix}.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text()).get("weight_map", {}))
        if listed != set(state):
            missing = sorted(listed - set(state))[:5]
            raise ConversionError(f"{index}: lists keys missing from the shards (e.g. {missing})")
    return state


def _shape_of(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if isinstance(state, LazyState):
        return state.shape(key)
    return tuple(state[key].shape)


class StateReader:
    """Hands out each key of ``state`` once (checking its shape) and reports what was never taken.

    ``where`` names the source in every error message (a path or "WorldDiT bundle").
    """

    def __init__(self, state: Mapping[str, Tensor], where: str):
        self.state, self.where = state, where
        self.taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            raise ConversionError(f"{self.where}: missing key '{key}'")
        return _shape_of(self.state, key)

    def take(self, key: str, shape: Optional[Sequence[int]] = None) -> Tensor:
        """The tensor at ``key`` (once); ``shape`` given: it must match."""
        if key in self.taken:
            raise ConversionError(f"{self.where}: key '{key}' consumed twice (a conversion rule is wrong)")
        found = self.shape(key)
        if shape is not None and tuple(found) != tuple(shape):
            raise ConversionError(f"{self.where}: key '{key}' has shape {list(found)}, expected {list(shape)}")
        self.taken.add(key)
        return self.state[key]

    def finish(self) -> None:
        """Raise naming the keys nothing consumed."""
        left = sorted(set(self.state) - self.taken)
        if left:
            more = f" ... ({len(left)} in all)" if len(left) > 12 else ""
            raise ConversionError(f"{self.where}: keys not consumed by the conversion: {', '.join(left[:12])}{more}")


@dataclass
class Rule:
    """One WorldDiT parameter ``ours`` and the source keys ``theirs`` it is made of.

    ``join`` builds ours from the source tensors (default: the single tensor itself) and ``split``
    is its exact inverse (WorldDiT tensor -> source tensors, in ``theirs`` order).
    """

    ours: str
    theirs: tuple[str, ...]
    join: Optional[Callable[[list[Tensor]], Tensor]] = None
    split: Optional[Callable[[Tensor], list[Tensor]]] = None


def rename(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,))


def concat(ours: str, theirs: Sequence[str]) -> Rule:
    """ours = cat(theirs, dim 0) (q, k, v projections into one qkv projection); split = equal chunks."""
    n = len(theirs)
    return Rule(ours, tuple(theirs), join=lambda ts: torch.cat(ts, dim=0),
                split=lambda t: [c.contiguous() for c in t.chunk(n, dim=0)])


def expected_shapes(cfg: WorldDiTConfig) -> dict[str, tuple[int, ...]]:
    """Every WorldDiT parameter name -> shape for ``cfg`` (the model is built on the meta device: no memory)."""
    from models.dit import WorldDiT

    with torch.device("meta"):
        model = WorldDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def apply_rules(rules: Iterable[Rule], source: Mapping[str, Tensor], *, to_worlddit: bool, cfg: WorldDiTConfig,
                where: str) -> dict[str, Tensor]:
    """Run ``rules`` over ``source`` and return the converted state dict.

    to_worlddit: source is the foreign checkpoint, the result WorldDiT's (shapes checked against a model built
    from ``cfg``); else source is a WorldDiT state dict (each tensor checked against ``cfg``'s model) and the
    result the foreign layout. Every source key must be consumed and every WorldDiT parameter produced.
    """
    ours_shapes = expected_shapes(cfg)
    reader = StateReader(source, where)
    out: dict[str, Tensor] = {}
    produced: set[str] = set()
    for r in rules:
        if r.ours not in ours_shapes:
            raise ConversionError(f"{where}: conversion rule names '{r.ours}', which a WorldDiT with this config lacks")
        produced.add(r.ours)
        if to_worlddit:
            parts = [reader.take(k) for k in r.theirs]
            t = parts[0] if r.join is None else r.join(parts)
            if tuple(t.shape) != ours_shapes[r.ours]:
                keys = ", ".join(f"'{k}' {list(p.shape)}" for k, p in zip(r.theirs, parts))
                raise ConversionError(f"{where}: {keys} give WorldDiT '{r.ours}' shape {list(t.shape)}, "
                                      f"expected {list(ours_shapes[r.ours])}")
            out[r.ours] = t
        else:
            t = reader.take(r.ours, ours_shapes[r.ours])
            parts = [t] if r.split is None else r.split(t)
            for k, p in zip(r.theirs, parts):
                if k in out:
                    raise ConversionError(f"{where}: two rules write '{k}'")
                out[k] = p
    reader.finish()
    if to_worlddit:
        missing = sorted(set(ours_shapes) - produced)
        if missing:
            raise ConversionError(f"{where}: nothing in the checkpoint provides WorldDiT parameters {missing[:8]}")
    return out


def cast_state(state: MutableMapping[str, Tensor], dtype: Optional[torch.dtype]) -> MutableMapping[str, Tensor]:
    """Floating-point tensors cast to ``dtype`` in place (None: unchanged)."""
    if dtype is not None:
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v.to(dtype)
    return state


def write_bundle(out: PathLike, state: Mapping[str, Tensor], cfg: WorldDiTConfig, *, autoencoder: Mapping[str, Any],
                 text_encoder: Mapping[str, Any], sampling: Mapping[str, Any], meta: Mapping[str, Any],
                 overwrite: bool = False) -> Path:
    """A converted bundle through :func:`models.bundle.save_bundle` (atomic, checksummed); the sampling section is
    validated with the parser inference uses first."""
    from models.bundle import save_bundle
    from models.sampling import split_sampling

    split_sampling(dict(sampling), f"converted bundle {out}")
    return save_bundle(out, dict(state), model_cfg=cfg, autoencoder_cfg=dict(autoencoder),
                       text_encoder_cfg=dict(text_encoder), sampling=dict(sampling), meta=dict(meta),
                       overwrite=overwrite)
