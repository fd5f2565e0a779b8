"""diffusers' ``HunyuanVideo15Transformer3DModel`` directory -> the official layout (models/convert/hunyuan.py).

diffusers renames HunyuanVideo-1.5's parameters (``x_embedder``, ``context_embedder``, ``transformer_blocks``,
...), splits the refiner's fused qkv into ``to_q/to_k/to_v`` and stores the final AdaLN vector as
(scale, shift) where the official layout has (shift, scale). :func:`diffusers_to_official` undoes exactly
that, so a diffusers checkpoint goes through the same official -> WorldDiT mapping as the released one.

Conventions checked against ours (tests/test_convert.py runs diffusers' module itself): the transformer's
``timestep`` is t = 1000 sigma (its flow-matching scheduler's ``sigmas * 1000``), its output is the velocity
eps - x0 of x_sigma = (1 - sigma) x0 + sigma eps (the scheduler steps x += (sigma_next - sigma) * output),
and its input channels are [noisy latents, first-frame latent at latent 0, mask] like WorldDiT's. So a
converted model is ``prediction="v"`` and needs no sign or scale change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from models.convert.common import ConversionError, StateReader, open_safetensors

__all__ = ["diffusers_to_official", "config_for_official", "read_diffusers"]

# diffusers name -> official name, as (regex, replacement) applied to the whole key; the first match wins.
_RENAMES: list[tuple[str, str]] = [
    (r"time_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
    (r"time_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.", "txt_in.t_embedder.mlp.0."),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.", "txt_in.t_embedder.mlp.2."),
    (r"context_embedder\.time_text_embed\.text_embedder\.linear_([12])\.", r"txt_in.c_embedder.linear_\1."),
    (r"context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm([12])\.",
     r"txt_in.individual_token_refiner.blocks.\1.norm\2."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2."),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.",
     r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1."),
    (r"context_embedder_2\.norm\.", "byt5_in.layernorm."),
    (r"context_embedder_2\.linear_([123])\.", r"byt5_in.fc\1."),
    (r"image_embedder\.norm_in\.", "vision_in.proj.0."),
    (r"image_embedder\.linear_1\.", "vision_in.proj.1."),
    (r"image_embedder\.linear_2\.", "vision_in.proj.3."),
    (r"image_embedder\.norm_out\.", "vision_in.proj.4."),
    (r"x_embedder\.proj\.", "img_in.proj."),
    (r"cond_type_embed\.weight", "cond_type_embedding.weight"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"double_blocks.\1.img_attn_\2."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.", r"double_blocks.\1.img_attn_\2_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.", r"double_blocks.\1.txt_attn_\2."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (r"proj_out\.", "final_layer.linear."),
]
_REFINER_QKV = re.compile(r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$")
_FINAL_MOD = re.compile(r"norm_out\.linear\.(weight|bias)$")
_COMPILED = [(re.compile(p), r) for p, r in _RENAMES]


def _swap_halves(t: Tensor) -> Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' (scale, shift) <-> the official (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_official(state: Mapping[str, Tensor], where: str = "diffusers checkpoint") -> dict[str, Tensor]:
    """The official-layout state dict of a diffusers ``HunyuanVideo15Transformer3DModel`` state dict.

    Every key is consumed; a key this mapping does not know (e.g. MeanFlow's ``timestep_embedder_r``) raises
    naming it.
    """
    reader = StateReader(state, where)
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}

    def put(key: str, value: Tensor, source: str) -> None:
        if key in out:
            raise ConversionError(f"{where}: '{source}' maps to '{key}', which another key already gave")
        out[key] = value

    for k in list(state):
        if (m := _REFINER_QKV.match(k)):
            block, which, kind = m.groups()
            qkv.setdefault(f"txt_in.individual_token_refiner.blocks.{block}.self_attn_qkv.{kind}", {})[which] = reader.take(k)
            continue
        if _FINAL_MOD.match(k):
            put("final_layer.adaLN_modulation.1." + k.rsplit(".", 1)[1], _swap_halves(reader.take(k)), k)
            continue
        for pattern, repl in _COMPILED:
            if pattern.match(k):
                new, n = pattern.subn(repl, k, count=1)
                if n and new != k:
                    put(new, reader.take(k), k)
                    break
        else:
            raise ConversionError(f"{where}: key '{k}' has no counterpart in HunyuanVideo-1.5's layout "
                                  f"(a MeanFlow / super-resolution or newer variant is not supported)")
    for key, parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ConversionError(f"{where}: refiner projection '{key}' lacks to_{sorted(set('qkv') - set(parts))}")
        put(key, torch.cat([parts["q"], parts["k"], parts["v"]], dim=0), key)
    reader.finish()
    return out


def config_for_official(config: Mapping[str, Any], where: str = "diffusers config") -> dict[str, Any]:
    """The fields of a diffusers transformer ``config.json`` that :func:`models.convert.hunyuan.config_from_official`
    reads (head count, RoPE), after checking what WorldDiT cannot represent."""
    if config.get("use_meanflow"):
        raise ConversionError(f"{where}: use_meanflow=true (a MeanFlow super-resolution transformer) is not supported")
    if config.get("patch_size_t", 1) != 1:
        raise ConversionError(f"{where}: patch_size_t={config['patch_size_t']}; WorldDiT needs a temporal patch of 1")
    keep = {k: config[k] for k in ("num_attention_heads", "rope_axes_dim", "rope_theta") if k in config}
    return keep


def read_diffusers(path: str | Path) -> tuple[Mapping[str, Tensor], dict[str, Any]]:
    """(lazy state, config.json) of a diffusers transformer directory (or a pipeline root with ``transformer/``)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path}: no config.json (expected a diffusers HunyuanVideo15Transformer3DModel directory)")
    config = json.loads((path / "config.json").read_text())
    cls = config.get("_class_name")
    if cls not in (None, "HunyuanVideo15Transformer3DModel"):
        raise ConversionError(f"{path}/config.json: _class_name {cls!r}, expected 'HunyuanVideo15Transformer3DModel'")
    return open_safetensors(path), config

