"""Text encoders behind one interface: ``encode(prompts) -> (tokens [B, L, D], mask [B, L] bool)``.

- ``none``: L = 0 tokens (an unconditional model is a valid model).
- ``hf``: a transformers encoder (T5 family through its encoder-only class, anything else through
  ``AutoModel``) loaded from a local directory; tokens are the hidden state of layer ``layer``
  (``-1`` last; HunyuanVideo's "skip 2 layers" is ``-3``).
- ``precomputed``: a lookup by caption in a ``.safetensors`` / ``.npz`` file written by
  :func:`save_precomputed` (or :func:`precompute_text_embeddings`), so training never loads a
  multi-GB text encoder.

Tokens are float32, zero at padded positions, on the encoder's device. The frozen encoders run
without gradients.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.autoencoders.base import parse_dtype

PRECOMPUTED_FORMAT = "worldsmith.text_embeddings.v1"


@dataclass
class TextEncoderConfig:
    """Which text encoder to build (Hydra group ``text_encoder``).

    kind: a key of ``TEXT_ENCODERS`` ("none", "hf", "precomputed").
    path: local model directory (hf; or a pipeline root with ``text_encoder/`` + ``tokenizer/``)
        or embeddings file (precomputed).
    max_length: tokens kept per prompt. layer: hidden-state index (hf).
    dtype: the dtype the hf model runs in. dim: token width of the ``none`` encoder's empty tokens.
    """

    kind: str = "none"
    path: Optional[str] = None
    max_length: int = 256
    layer: int = -1
    dtype: str = "float32"
    dim: int = 0


def caption_key(caption: str) -> str:
    """Storage key of a caption in a precomputed file: its SHA-256 in hex."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TextEncoder(nn.Module, abc.ABC):
    """Prompts -> (tokens [B, L, dim] float32, mask [B, L] bool)."""

    name: str = "text_encoder"

    def __init__(self) -> None:
        super().__init__()
        # Empty buffer: follows .to(device) so parameter-free encoders know where to put outputs.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Token width D."""

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Tokens and mask for a non-empty list of prompts."""

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(tokens [B, L, D] float32 zero where padded, mask [B, L] bool) for ``prompts``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{self.name} text encoder: encode expects a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{self.name} text encoder: encode got an empty list of prompts")
        tokens, mask = self._encode(prompts)
        tokens = tokens.float() * mask.unsqueeze(-1).to(tokens.dtype)
        return tokens, mask.bool()


class NoTextEncoder(TextEncoder):
    """Unconditional: every prompt gives zero tokens [B, 0, dim]."""

    name = "none"

    def __init__(self, dim: int = 0):
        super().__init__()
        if dim < 0:
            raise ValueError(f"none text encoder: dim must be >= 0, got {dim}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        B = len(prompts)
        return torch.zeros(B, 0, self._dim, device=self.device), torch.zeros(B, 0, dtype=torch.bool, device=self.device)


_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class HFTextEncoder(TextEncoder):
    """A transformers tokenizer + model; tokens are hidden state ``layer``, truncated to ``max_length``."""

    name = "hf"

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 256, layer: int = -1):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length, self.layer = int(max_length), int(layer)
        if self.max_length < 1:
            raise ValueError(f"hf text encoder: max_length must be >= 1, got {max_length}")

    @classmethod
    def from_pretrained(cls, path: str, *, max_length: int = 256, layer: int = -1, dtype: str = "float32") -> "HFTextEncoder":
        """Load tokenizer and model from a local directory (or ``text_encoder/`` + ``tokenizer/`` under it)."""
        import transformers

        root = Path(path).expanduser()
        model_dir, tok_dir = root, root
        if not (root / "config.json").is_file() and (root / "text_encoder" / "config.json").is_file():
            model_dir, tok_dir = root / "text_encoder", root / "tokenizer"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"hf text encoder: no config.json in {root} or {root / 'text_encoder'}")
        torch_dtype = parse_dtype(dtype, "text_encoder.dtype")
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = getattr(transformers, _T5_ENCODERS.get(config.model_type, "AutoModel"))
        model = model_cls.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(tokenizer, model, max_length=max_length, layer=layer)

    @property
    def dim(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if ids.shape[1] == 0:  # only empty prompts and a tokenizer that adds no special tokens
            return torch.zeros(len(prompts), 0, self.dim, device=device), mask.bool()
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if not -len(hidden) <= self.layer < len(hidden):
            raise ValueError(f"hf text encoder: layer {self.layer} out of range for {len(hidden)} hidden states")
        return hidden[self.layer], mask.bool()


class PrecomputedTextEncoder(TextEncoder):
    """Embeddings looked up by caption in a file written by :func:`save_precomputed`."""

    name = "precomputed"

    def __init__(self, path: str, max_length: int = 256):
        super().__init__()
        self.path = Path(path).expanduser()
        self.max_length = int(max_length)
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed text encoder: embeddings file {self.path} does not exist")
        self._get, keys, meta_dim = _open_embeddings(self.path)
        self._keys = set(keys)
        if meta_dim is not None:
            self._dim = meta_dim
        elif keys:
            self._dim = int(self._get(keys[0]).shape[-1])
        else:
            raise ValueError(f"precomputed text encoder: {self.path} holds no embeddings")

    def __getstate__(self) -> dict:
        # File handles do not pickle (DataLoader workers): drop them, reopen on first lookup.
        state = self.__dict__.copy()
        state["_get"] = None
        return state

    @property
    def dim(self) -> int:
        return self._dim

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _lookup(self, caption: str) -> Tensor:
        key = caption_key(caption)
        if key not in self._keys:
            raise KeyError(
                f"precomputed text encoder: {self.path} has no embedding for caption {caption[:80]!r}; "
                f"re-run the text-embedding precompute over this data"
            )
        if self._get is None:
            self._get = _open_embeddings(self.path)[0]
        emb = self._get(key)
        if emb.ndim != 2 or emb.shape[1] != self._dim:
            raise ValueError(f"precomputed text encoder: {self.path} entry {key}: expected [L, {self._dim}], got {list(emb.shape)}")
        return emb[: self.max_length].float()

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embs = [self._lookup(p) for p in prompts]
        L = max(e.shape[0] for e in embs)
        tokens = torch.zeros(len(embs), L, self._dim)
        mask = torch.zeros(len(embs), L, dtype=torch.bool)
        for i, e in enumerate(embs):
            tokens[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return tokens.to(self.device), mask.to(self.device)


def _open_embeddings(path: Path) -> tuple[Callable[[str], Tensor], list[str], Optional[int]]:
    """(getter, keys, dim from metadata) for a .safetensors or .npz embeddings file; lazy per key."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise ValueError(f"precomputed text encoder: cannot read {path}: {e}") from None
        meta = handle.metadata() or {}
        if meta.get("format") != PRECOMPUTED_FORMAT:
            raise ValueError(f"precomputed text encoder: {path} is not a {PRECOMPUTED_FORMAT} file (metadata {meta})")
        return handle.get_tensor, list(handle.keys()), int(meta["dim"])
    if path.suffix == ".npz":
        archive = np.load(str(path))
        return (lambda k: torch.from_numpy(archive[k])), list(archive.files), None
    raise ValueError(f"precomputed text encoder: {path} must be a .safetensors or .npz file")


def save_precomputed(path: str | Path, embeddings: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Path:
    """Write caption -> embedding [L, D] (valid tokens only) to ``.safetensors`` or ``.npz``; returns the path."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    dim: Optional[int] = None
    for caption, emb in embeddings.items():
        if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
            raise ValueError(
                f"save_precomputed: caption {caption[:80]!r}: expected [L, {dim if dim is not None else 'D'}], "
                f"got {list(emb.shape)}"
            )
        dim = emb.shape[1]
        tensors[caption_key(caption)] = emb.detach().to("cpu", dtype).contiguous()
    if dim is None:
        raise ValueError("save_precomputed: no embeddings to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"format": PRECOMPUTED_FORMAT, "dim": str(dim), "count": str(len(tensors))})
    elif path.suffix == ".npz":
        if dtype == torch.bfloat16:
            raise ValueError(f"save_precomputed: {path}: npz cannot store bfloat16; use .safetensors")
        np.savez(tmp, **{k: v.numpy() for k, v in tensors.items()})
    else:
        raise ValueError(f"save_precomputed: {path} must end in .safetensors or .npz")
    tmp.replace(path)
    return path


def precompute_text_embeddings(
    encoder: TextEncoder,
    captions: Sequence[str],
    path: str | Path,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode the distinct ``captions`` with ``encoder`` and save them for a ``precomputed`` encoder."""
    unique = list(dict.fromkeys(captions))
    out: dict[str, Tensor] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        tokens, mask = encoder.encode(chunk)
        for caption, t, m in zip(chunk, tokens, mask):
            out[caption] = t[m]
    return save_precomputed(path, out, dtype)


TEXT_ENCODERS: dict[str, Callable[[TextEncoderConfig], TextEncoder]] = {
    "none": lambda cfg: NoTextEncoder(cfg.dim),
    "hf": lambda cfg: HFTextEncoder.from_pretrained(
        _require_path(cfg), max_length=cfg.max_length, layer=cfg.layer, dtype=cfg.dtype
    ),
    "precomputed": lambda cfg: PrecomputedTextEncoder(_require_path(cfg), max_length=cfg.max_length),
}


def _require_path(cfg: TextEncoderConfig) -> str:
    if not cfg.path:
        raise ValueError(f"text_encoder.path: kind '{cfg.kind}' needs a path")
    return cfg.path


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The text encoder ``cfg.kind`` names, built from ``cfg``."""
    try:
        factory = TEXT_ENCODERS[cfg.kind]
    except KeyError:
        raise ValueError(f"text_encoder.kind: unknown text encoder {cfg.kind!r}; known: {sorted(TEXT_ENCODERS)}") from None
    return factory(cfg)
