"""Text encoders behind one interface: ``encode(prompts) -> (tokens [B, L, D], mask [B, L] bool)``.

- ``none``: L = 0 tokens (an unconditional model is a valid model).
- ``hf``: a transformers encoder (T5 family through its encoder-only class, anything else through
  ``AutoModel``) loaded from a local directory; tokens are the hidden state of layer ``layer``
  (``-1`` last; HunyuanVideo's "skip 2 layers" is ``-3``).
- ``precomputed``: a lookup by caption in a ``.safetensors`` / ``.npz`` file written by
  :func:`save_precomputed` (or :func:`precompute_text_embeddings`), so training never loads a
  multi-GB text encoder. A *streams* file (:func:`save_precomputed_streams`, written for the
  released HunyuanVideo-1.5 / WorldPlay models by ``python -m models.convert embeddings``) holds each
  caption's LLM and ByT5 tokens and the SigLIP tokens of conditioning images, and its encoder returns
  them packed as those models read them (:func:`pack_text_streams`).

Tokens are float32, zero at padded positions, on the encoder's device. The frozen encoders run
without gradients.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.autoencoders.base import parse_dtype

PRECOMPUTED_FORMAT = "worldsmith.text_embeddings.v1"
PRECOMPUTED_STREAMS_FORMAT = "worldsmith.text_streams.v1"


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
        self.layout: Optional[StreamLayout] = _stream_layout(self.path)
        self._images: set[str] = set()
        if self.layout is not None:  # a streams file: text.<key>.llm / text.<key>.byt5 / image.<key>
            self._keys = {k[len("text."):-len(".llm")] for k in keys if k.startswith("text.") and k.endswith(".llm")}
            self._images = {k[len("image."):] for k in keys if k.startswith("image.")}
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

    def _lookup_streams(self, caption: str) -> tuple[Tensor, Tensor]:
        """(LLM tokens [L, llm_dim] truncated to max_length, ByT5 tokens [G, byt5_dim]) of a caption (streams file)."""
        key = caption_key(caption)
        if key not in self._keys:
            raise KeyError(f"precomputed text encoder: {self.path} has no embedding for caption {caption[:80]!r}; "
                           f"re-run `python -m models.convert embeddings` over these captions")
        return self._read(f"text.{key}.llm")[: self.max_length].float(), self._read(f"text.{key}.byt5").float()

    def _read(self, name: str) -> Tensor:
        """One tensor of the file (reopened after unpickling)."""
        if self._get is None:
            self._get = _open_embeddings(self.path)[0]
        return self._get(name)

    def has_image(self, image) -> bool:
        """Whether the file holds vision tokens for ``image`` (uint8 [H, W, 3]); see :func:`image_key`."""
        return image_key(image) in self._images

    def encode(self, prompts: Sequence[str], images: Optional[Sequence] = None) -> tuple[Tensor, Tensor]:
        """As :meth:`TextEncoder.encode`; a streams file also takes ``images`` (one uint8 [H, W, 3] conditioning
        image or None per prompt), whose SigLIP tokens fill the vision slots (None or no images: slots masked)."""
        if images is None:
            return super().encode(prompts)
        if self.layout is None:
            raise ValueError(f"precomputed text encoder: {self.path} is not a streams file; it holds no image tokens")
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"precomputed text encoder: {len(images)} images for {len(prompts)} prompts")
        vision = []
        for img in images:
            if img is None:
                vision.append(None)
                continue
            key = image_key(img)
            if key not in self._images:
                raise KeyError(f"precomputed text encoder: {self.path} has no vision tokens for this image (key "
                               f"{key[:16]}...); run `python -m models.convert embeddings --image ...` for it")
            vision.append(self._read(f"image.{key}").float())
        texts = [self._lookup_streams(p) for p in prompts]
        tokens, mask = pack_text_streams([t[0] for t in texts], [t[1] for t in texts], vision, self.layout)
        return (tokens * mask.unsqueeze(-1)).to(self.device), mask.to(self.device)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if self.layout is not None:
            texts = [self._lookup_streams(p) for p in prompts]
            tokens, mask = pack_text_streams([t[0] for t in texts], [t[1] for t in texts], None, self.layout)
            return tokens.to(self.device), mask.to(self.device)
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
        if meta.get("format") not in (PRECOMPUTED_FORMAT, PRECOMPUTED_STREAMS_FORMAT):
            raise ValueError(f"precomputed text encoder: {path} is not a {PRECOMPUTED_FORMAT} file (nor a "
                             f"{PRECOMPUTED_STREAMS_FORMAT} one; metadata {meta})")
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


@dataclass(frozen=True)
class StreamLayout:
    """How HunyuanVideo-1.5's three token streams pack into one text input [B, V + G + L, llm_dim]: ``vision_tokens``
    SigLIP slots (first ``vision_dim`` channels), ``byt5_tokens`` ByT5 slots (first ``byt5_dim`` channels), then the
    LLM tokens. It must match the model's ``vision_tokens`` / ``byt5_tokens`` (models/config.py)."""

    llm_dim: int
    byt5_dim: int = 1472
    vision_dim: int = 1152
    byt5_tokens: int = 256
    vision_tokens: int = 729

    def __post_init__(self) -> None:
        for f in ("byt5_dim", "vision_dim"):
            if not 0 <= getattr(self, f) <= self.llm_dim:
                raise ValueError(f"StreamLayout.{f}={getattr(self, f)} must lie in [0, llm_dim={self.llm_dim}]")
        if self.byt5_tokens < 0 or self.vision_tokens < 0:
            raise ValueError("StreamLayout: token counts must be >= 0")

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def image_key(image) -> str:
    """Storage key of a conditioning image (uint8 [H, W, 3], numpy or torch): SHA-256 of its shape and bytes."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image_key: expected a uint8 [H, W, 3] image, got {arr.dtype} {list(arr.shape)}")
    h = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}x3:".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def pack_text_streams(llm: Sequence[Tensor], byt5: Optional[Sequence[Optional[Tensor]]],
                      vision: Optional[Sequence[Optional[Tensor]]], layout: StreamLayout) -> tuple[Tensor, Tensor]:
    """Per-sample valid tokens -> (tokens [B, V + G + L, llm_dim] float32 zero where padded, mask [B, V + G + L] bool).

    llm[i] [Li, llm_dim]; byt5[i] [Gi <= byt5_tokens, byt5_dim] or None (no glyph text); vision[i]
    [Vi <= vision_tokens, vision_dim] or None (no image: the slots are masked, HunyuanVideo-1.5's text-to-video
    rule). L = the longest Li.
    """
    B = len(llm)
    V, G = layout.vision_tokens, layout.byt5_tokens
    L = max((int(t.shape[0]) for t in llm), default=0)
    tokens = torch.zeros(B, V + G + L, layout.llm_dim)
    mask = torch.zeros(B, V + G + L, dtype=torch.bool)
    for i in range(B):
        for name, t, start, slots, dim in (("vision", None if vision is None else vision[i], 0, V, layout.vision_dim),
                                           ("byt5", None if byt5 is None else byt5[i], V, G, layout.byt5_dim),
                                           ("llm", llm[i], V + G, L, layout.llm_dim)):
            if t is None:
                continue
            if t.dim() != 2 or t.shape[1] != dim or t.shape[0] > slots:
                raise ValueError(f"pack_text_streams: sample {i} {name} tokens {list(t.shape)}: expected "
                                 f"[<= {slots}, {dim}]")
            tokens[i, start:start + t.shape[0], :dim] = t.float()
            mask[i, start:start + t.shape[0]] = True
    return tokens, mask


def _stream_layout(path: Path) -> Optional[StreamLayout]:
    """The layout recorded in a streams file's metadata, or None for a plain embeddings file."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    meta = safe_open(str(path), framework="pt").metadata() or {}
    if meta.get("format") != PRECOMPUTED_STREAMS_FORMAT:
        return None
    fields = [f.name for f in dataclasses.fields(StreamLayout)]
    try:
        return StreamLayout(**{f: int(meta[f]) for f in fields})
    except (KeyError, ValueError) as e:
        raise ValueError(f"precomputed text encoder: {path}: bad streams metadata {meta}: {e}") from None


def save_precomputed_streams(path: str | Path, texts: Mapping[str, tuple[Tensor, Optional[Tensor]]],
                             images: Mapping[str, Tensor], layout: StreamLayout,
                             dtype: torch.dtype = torch.float32) -> Path:
    """Write a streams file: ``texts`` caption -> (LLM tokens [L, llm_dim], ByT5 tokens [G, byt5_dim] or None), valid
    tokens only; ``images`` :func:`image_key` -> SigLIP tokens [V, vision_dim]. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_precomputed_streams: {path} must end in .safetensors")
    if not texts:
        raise ValueError("save_precomputed_streams: no captions to save")
    tensors: dict[str, Tensor] = {}
    for caption, (llm, byt5) in texts.items():
        byt5 = torch.zeros(0, layout.byt5_dim) if byt5 is None else byt5
        for name, t, dim, most in (("llm", llm, layout.llm_dim, None), ("byt5", byt5, layout.byt5_dim, layout.byt5_tokens)):
            if t.dim() != 2 or t.shape[1] != dim or (most is not None and t.shape[0] > most):
                raise ValueError(f"save_precomputed_streams: caption {caption[:80]!r} {name} tokens {list(t.shape)}: "
                                 f"expected [{'<= ' + str(most) if most is not None else 'L'}, {dim}]")
            tensors[f"text.{caption_key(caption)}.{name}"] = t.detach().to("cpu", dtype).contiguous()
    for key, t in images.items():
        if t.dim() != 2 or t.shape[1] != layout.vision_dim or t.shape[0] > layout.vision_tokens:
            raise ValueError(f"save_precomputed_streams: image {key[:16]}... tokens {list(t.shape)}: expected "
                             f"[<= {layout.vision_tokens}, {layout.vision_dim}]")
        tensors[f"image.{key}"] = t.detach().to("cpu", dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    meta = {"format": PRECOMPUTED_STREAMS_FORMAT, "dim": str(layout.llm_dim), "count": str(len(texts)),
            "images": str(len(images)), **layout.metadata()}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


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
