"""LoRA fine-tuning of any stage's trainable model, through peft.

``lora.enabled=true`` wraps the student in LoRA adapters (rank, alpha, dropout, target modules by
name suffix); only adapter weights train. A stage exports both the adapter (peft format, tiny) and
a merged bundle (adapters folded into the base weights) that runs like any other bundle. They
agree: base + ``adapter/adapter.safetensors`` = ``bundle/model.safetensors`` (the EMA where the run
keeps one) and base + ``adapter/adapter_raw.safetensors`` = ``bundle/model_raw.safetensors`` (the
raw fine-tune). File layout and merging without peft: ``models/lora.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.lora import ADAPTER, ADAPTER_CONFIG, ADAPTER_RAW, merge_lora, read_adapter


@dataclass
class LoraConfig:
    """LoRA adapters on the student (peft)."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers whose qualified name ends with one of these get adapters (WorldDiT names).
    target_modules: list[str] = field(default_factory=lambda: ["vid.qkv", "vid.proj", "vid.mlp.0", "vid.mlp.2", "txt.qkv", "txt.proj"])
    init: str = "default"  # peft init_lora_weights: default (B = 0) | gaussian


def matching_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Qualified names of nn.Linear modules whose name ends with one of ``targets``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters in place; only adapter parameters stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = matching_modules(model, cfg.target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:12]
        raise ValueError(f"lora.target_modules={cfg.target_modules} match no nn.Linear in {type(model).__name__}; some names: {linear}")
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=names,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
    )
    model = inject_adapter_in_model(peft_cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def has_lora(state_or_model) -> bool:
    """Whether a module or a state dict carries LoRA adapters."""
    keys = state_or_model.keys() if isinstance(state_or_model, dict) else (n for n, _ in state_or_model.named_parameters())
    return any("lora_" in k for k in keys)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a (full, gathered) state dict of a LoRA-wrapped model."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if "lora_" in k}


def merge_lora_state(state: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Fold adapters into base weights: W <- W + (alpha / rank) * B @ A (``models.lora.merge_lora``)."""
    return merge_lora(state, cfg.alpha, cfg.rank)


def save_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, out_dir: str | Path, base: dict | None = None, *,
                 raw_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter directory (layout: ``models/lora.py``).

    ``state``: the weights the merged bundle runs (the EMA where the run kept one), so that base +
    ``adapter.safetensors`` equals the bundle's ``model.safetensors``; ``raw_state`` (runs with an
    EMA): the raw fine-tune, written as ``adapter_raw.safetensors`` (= ``model_raw.safetensors``).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters = adapter_state(state)
    targets = sorted({k.split(".lora_")[0] for k in adapters})
    save_file(adapters, str(out / ADAPTER))
    files = {ADAPTER: "ema" if raw_state is not None else "raw"}
    if raw_state is not None:
        save_file(adapter_state(raw_state), str(out / ADAPTER_RAW))
        files[ADAPTER_RAW] = "raw"
    else:
        (out / ADAPTER_RAW).unlink(missing_ok=True)  # a stale one of an earlier export
    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": targets, "base": base, "files": files}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, weights_kind: str = "model") -> nn.Module:
    """Attach a saved adapter to a base model (the inverse of :func:`save_adapter`, peft-wrapped); loads strictly.

    ``weights_kind``: "model" (``adapter.safetensors``) or "raw" (``adapter_raw.safetensors``).
    To fold an adapter into a plain model instead, ``models.lora.merge_adapter``.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    adapter_dir = Path(adapter_dir)
    weights, meta = read_adapter(adapter_dir, weights_kind)
    peft_cfg = PeftLoraConfig(r=meta["rank"], lora_alpha=meta["alpha"], lora_dropout=meta["dropout"], target_modules=meta["target_modules"])
    model = inject_adapter_in_model(peft_cfg, model)
    own = {k for k in model.state_dict() if "lora_" in k}
    if set(weights) != own:
        raise ValueError(f"{adapter_dir}: adapter keys do not match the model: missing {sorted(own - set(weights))[:3]}, unexpected {sorted(set(weights) - own)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model
