"""LoRA adapters as files, and folding them into a model's weights (no peft needed to run one).

An adapter directory (written by ``train.lora.save_adapter`` when a LoRA run exports)::

    adapter.safetensors      the adapter whose merge is the bundle's model.safetensors (EMA where kept)
    adapter_raw.safetensors  the raw (non-EMA) adapter, only when the run kept an EMA: merge = model_raw.safetensors
    adapter_config.json      rank, alpha, dropout, target modules, base bundle lineage, which file is which

Keys are peft's (``blocks.0.vid.qkv.lora_A.default.weight`` and ``lora_B``); merging adds
``(alpha / rank) * B @ A`` to the base module's ``weight`` (``blocks.0.vid.qkv.weight``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

ADAPTER = "adapter.safetensors"
ADAPTER_RAW = "adapter_raw.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SUFFIX_A = ".lora_A.default.weight"
SUFFIX_B = ".lora_B.default.weight"


def merge_lora(state: Mapping[str, Tensor], alpha: float, rank: int) -> dict[str, Tensor]:
    """Fold the adapters of a peft-wrapped state dict into its base weights: W <- W + (alpha / rank) * B @ A.

    Keys lose peft's wrapping (``.base_layer.``); works on full state dicts, so no live model is needed.
    """
    out = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in state.items() if "lora_" not in k}
    for key in [k for k in state if k.endswith(SUFFIX_A)]:
        prefix = key[: -len(SUFFIX_A)]
        A, B = state[key].float(), state[prefix + SUFFIX_B].float()
        w = out[prefix + ".weight"]
        out[prefix + ".weight"] = (w.float() + (alpha / rank) * (B @ A)).to(w.dtype)
    return out


def read_adapter(adapter_dir: str | Path, weights: str = "model") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(adapter tensors, adapter_config.json) of an adapter directory; ``weights`` "model" or "raw"."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if weights not in ("model", "raw"):
        raise ValueError(f"adapter {adapter_dir}: weights must be 'model' or 'raw', got {weights!r}")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter {adapter_dir}: no {ADAPTER_CONFIG} (an adapter directory is <run>/export/adapter)")
    meta = json.loads(config_path.read_text())
    name = ADAPTER if weights == "model" else ADAPTER_RAW
    path = adapter_dir / name
    if weights == "raw" and not path.is_file():
        path = adapter_dir / ADAPTER  # a run without an EMA: one adapter, the raw one
        if (meta.get("files") or {}).get(ADAPTER, "raw") != "raw":
            raise FileNotFoundError(f"adapter {adapter_dir}: no {ADAPTER_RAW}")
    if not path.is_file():
        raise FileNotFoundError(f"adapter {adapter_dir}: missing {path.name}")
    return load_file(str(path)), meta


def merge_adapter(model: nn.Module, adapter_dir: str | Path, weights: str = "model") -> nn.Module:
    """Add an adapter to a plain (not peft-wrapped) model's weights in place; every adapter key must match.

    ``weights``: "model" (``adapter.safetensors``: what the LoRA run's merged bundle runs) or "raw".
    """
    tensors, meta = read_adapter(adapter_dir, weights)
    params = dict(model.named_parameters())
    prefixes = sorted(k[: -len(SUFFIX_A)] for k in tensors if k.endswith(SUFFIX_A))
    unknown = [p for p in prefixes if f"{p}.weight" not in params or f"{p}{SUFFIX_B}" not in tensors]
    if not prefixes or unknown:
        raise KeyError(f"adapter {adapter_dir}: its layers do not match the model: "
                       f"{unknown[:3] if unknown else 'no lora_A/lora_B pairs'}")
    scale = float(meta["alpha"]) / int(meta["rank"])
    with torch.no_grad():
        for p in prefixes:
            w = params[f"{p}.weight"]
            A = tensors[p + SUFFIX_A].to(w.device, torch.float32)
            B = tensors[p + SUFFIX_B].to(w.device, torch.float32)
            if tuple((B @ A).shape) != tuple(w.shape):
                raise ValueError(f"adapter {adapter_dir}: '{p}' is {list((B @ A).shape)}, the model's weight {list(w.shape)}")
            w.copy_((w.float() + scale * (B @ A)).to(w.dtype))
    return model
