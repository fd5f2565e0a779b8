"""LoRA fine-tuning of any stage's trainable model, through peft.

``lora.enabled=true`` wraps the student in LoRA adapters (rank, alpha, dropout, target modules by
name suffix); only adapter weights train. A stage exports both the adapter (peft format, tiny) and
a merged bundle (adapters folded into the base weights) that runs like any other bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


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
    """Fold adapters into base weights: W <- W + (alpha / rank) * B @ A; keys lose peft's wrapping.

    Works on full state dicts (e.g. gathered from FSDP on rank 0), so export needs no live model.
    """
    suffix_a = ".lora_A.default.weight"
    out = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in state.items() if "lora_" not in k}
    for key in [k for k in state if k.endswith(suffix_a)]:
        prefix = key[: -len(suffix_a)]
        A, B = state[key].float(), state[prefix + ".lora_B.default.weight"].float()
        w = out[prefix + ".weight"]
        out[prefix + ".weight"] = (w.float() + (cfg.alpha / cfg.rank) * (B @ A)).to(w.dtype)
    return out


def save_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, out_dir: str | Path, base: dict | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` (rank, alpha, targets, base bundle)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters = adapter_state(state)
    targets = sorted({k.split(".lora_")[0] for k in adapters})
    save_file(adapters, str(out / "adapter.safetensors"))
    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": targets, "base": base}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=1))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach a saved adapter to a base model (the inverse of :func:`save_adapter`); loads strictly."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_cfg = PeftLoraConfig(r=meta["rank"], lora_alpha=meta["alpha"], lora_dropout=meta["dropout"], target_modules=meta["target_modules"])
    model = inject_adapter_in_model(peft_cfg, model)
    weights = load_file(str(adapter_dir / "adapter.safetensors"))
    own = {k for k in model.state_dict() if "lora_" in k}
    if set(weights) != own:
        raise ValueError(f"{adapter_dir}: adapter keys do not match the model: missing {sorted(own - set(weights))[:3]}, unexpected {sorted(set(weights) - own)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model
