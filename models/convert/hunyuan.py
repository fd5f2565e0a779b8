"""HunyuanVideo-1.5's own checkpoint layout <-> WorldDiT (the official ``transformer/480p_i2v`` directory).

The released transformer (``HunyuanVideo_1_5_DiffusionTransformer``) names its parameters ``img_in``,
``time_in``, ``txt_in`` (the token refiner with its ``t_embedder``), ``byt5_in``, ``vision_in``,
``cond_type_embedding``, ``double_blocks.{i}.{img,txt}_*`` and ``final_layer``; HY-WorldPlay's action
checkpoints are the same layout plus ``action_in`` and ``double_blocks.{i}.img_attn_prope_proj`` (models/convert/
worldplay.py). This module holds the one mapping between that layout and WorldDiT's parameters, in both
directions, and reads the shape of a WorldDiT from a checkpoint.

Arithmetic that differs only in how it is written, and how the mapping makes it exact:

* q, k, v are three Linear layers there, one ``qkv`` Linear here: concatenated along the output dim.
* the patch embedding is a Conv3d with kernel = stride = (1, ph, pw) there, a Linear over (C, ph, pw) here.
* the final layer's AdaLN vector is (shift, scale) in both; RoPE pairs channels (2i, 2i+1) per axis
  (t, h, w) in both; the MLPs are GELU-tanh (blocks) and SiLU (refiner) in both; q/k RMSNorm eps 1e-6.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor

from models.config import WorldDiTConfig
from models.convert.common import ConversionError, Rule, StateReader, apply_rules, concat, open_safetensors, rename

__all__ = ["official_rules", "config_from_official", "official_to_worlddit", "worlddit_to_official", "read_official",
           "UNSUPPORTED"]

# Parts of the released code that WorldDiT has no counterpart for: converting them would drop weights.
UNSUPPORTED = {
    "single_blocks.": "single-stream blocks (HunyuanVideo-1.5 has none; WorldDiT is double-stream only)",
    "guidance_in.": "an embedded-guidance input (guidance-distilled checkpoints)",
    "vector_in.": "a pooled-text vector input (text_pool_type)",
    "time_r_in.": "a second timestep input (MeanFlow super-resolution checkpoints)",
}


def _pair(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    return [rename(f"{ours}.weight", f"{theirs}.weight")] + ([rename(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def official_rules(cfg: WorldDiTConfig) -> list[Rule]:
    """Every WorldDiT parameter of ``cfg`` with the official keys it is made of."""
    D = cfg.hidden
    _, ph, pw = cfg.patch
    cin = 2 * cfg.latent_channels + 1 if cfg.i2v else cfg.latent_channels
    rules = [
        Rule("patch_embed.proj.weight", ("img_in.proj.weight",),
             join=lambda ts: ts[0].reshape(ts[0].shape[0], -1),  # [D, Cin, 1, ph, pw] -> [D, Cin*ph*pw]
             split=lambda t: [t.reshape(D, cin, 1, ph, pw)]),
        rename("patch_embed.proj.bias", "img_in.proj.bias"),
    ]
    embedders = [("time_embed", "time_in")] + ([("action_embed", "action_in")] if cfg.action else [])
    for ours, theirs in embedders:
        rules += _pair(f"{ours}.mlp.0", f"{theirs}.mlp.0") + _pair(f"{ours}.mlp.2", f"{theirs}.mlp.2")
    if cfg.text_dim:
        rules += _pair("text_embed.in_proj", "txt_in.input_embedder")
        rules += _pair("text_embed.pool.0", "txt_in.c_embedder.linear_1") + _pair("text_embed.pool.2", "txt_in.c_embedder.linear_2")
        if cfg.text_refiner_time:
            rules += _pair("text_embed.time.mlp.0", "txt_in.t_embedder.mlp.0") + _pair("text_embed.time.mlp.2", "txt_in.t_embedder.mlp.2")
        for j in range(cfg.text_refiner_depth):
            o, t = f"text_embed.blocks.{j}", f"txt_in.individual_token_refiner.blocks.{j}"
            rules += _pair(f"{o}.norm1", f"{t}.norm1") + _pair(f"{o}.qkv", f"{t}.self_attn_qkv", cfg.qkv_bias)
            rules += _pair(f"{o}.proj", f"{t}.self_attn_proj") + _pair(f"{o}.norm2", f"{t}.norm2")
            rules += _pair(f"{o}.mlp.0", f"{t}.mlp.fc1") + _pair(f"{o}.mlp.2", f"{t}.mlp.fc2")
            rules += _pair(f"{o}.gates.1", f"{t}.adaLN_modulation.1")
    if cfg.vision_dim:
        for ours, idx in (("norm_in", 0), ("fc1", 1), ("fc2", 3), ("norm_out", 4)):
            rules += _pair(f"vision_embed.{ours}", f"vision_in.proj.{idx}")
    if cfg.byt5_dim:
        for ours, theirs in (("norm", "layernorm"), ("fc1", "fc1"), ("fc2", "fc2"), ("fc3", "fc3")):
            rules += _pair(f"byt5_embed.{ours}", f"byt5_in.{theirs}")
    if cfg.cond_type_embed:
        rules.append(rename("cond_type.weight", "cond_type_embedding.weight"))
    streams = [("vid", "img")] + ([("txt", "txt")] if cfg.text_dim else [])
    for i in range(cfg.depth):
        b, o = f"blocks.{i}", f"double_blocks.{i}"
        for s, t in streams:
            rules += _pair(f"{b}.{s}.mod", f"{o}.{t}_mod.linear")
            rules.append(concat(f"{b}.{s}.qkv.weight", [f"{o}.{t}_attn_{x}.weight" for x in "qkv"]))
            if cfg.qkv_bias:
                rules.append(concat(f"{b}.{s}.qkv.bias", [f"{o}.{t}_attn_{x}.bias" for x in "qkv"]))
            if cfg.qk_norm:
                rules += [rename(f"{b}.{s}.q_norm.weight", f"{o}.{t}_attn_q_norm.weight"),
                          rename(f"{b}.{s}.k_norm.weight", f"{o}.{t}_attn_k_norm.weight")]
            rules += _pair(f"{b}.{s}.proj", f"{o}.{t}_attn_proj")
            rules += _pair(f"{b}.{s}.mlp.0", f"{o}.{t}_mlp.fc1") + _pair(f"{b}.{s}.mlp.2", f"{o}.{t}_mlp.fc2")
        if cfg.camera:
            rules += _pair(f"{b}.prope_proj", f"{o}.img_attn_prope_proj")
    rules += _pair("final.mod", "final_layer.adaLN_modulation.1") + _pair("final.linear", "final_layer.linear")
    return rules


def _count(keys, pattern: str) -> int:
    """1 + the largest index N in keys matching ``pattern`` (a regex with one group), checking 0..N-1 are all there."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        return 0
    n = max(found) + 1
    gaps = sorted(set(range(n)) - found)
    if gaps:
        raise ConversionError(f"checkpoint: {pattern} has indices up to {n - 1} but lacks {gaps[:5]}")
    return n


def config_from_official(state: Mapping[str, Tensor], config: Optional[Mapping[str, Any]] = None, *,
                         text_sigma: str = "zero", text_attends_video: bool = False,
                         vision_tokens: int = 729, byt5_tokens: int = 256, where: str = "checkpoint") -> WorldDiTConfig:
    """The WorldDiTConfig whose parameters a checkpoint in the official layout holds.

    Shapes come from the weights. Head count, RoPE dims and theta come from ``config`` (the official
    ``config.json``: heads_num, rope_dim_list, rope_theta; or diffusers': num_attention_heads, rope_axes_dim)
    when given, else from the q-norm width (head_dim), with HunyuanVideo-1.5's [16, 56, 56] / 256 for
    head_dim 128. ``text_sigma`` / ``text_attends_video`` select the text-stream arithmetic (models/config.py).
    """
    config = dict(config or {})
    keys = list(state)
    for prefix, what in UNSUPPORTED.items():
        hit = [k for k in keys if k.startswith(prefix)]
        if hit:
            raise ConversionError(f"{where}: '{hit[0]}' belongs to {what}, which WorldDiT does not implement")
    if config.get("mm_single_blocks_depth"):
        raise ConversionError(f"{where}: config mm_single_blocks_depth={config['mm_single_blocks_depth']}: "
                              f"{UNSUPPORTED['single_blocks.']}")
    r = StateReader(state, where)
    D, cin, pt, ph, pw = r.shape("img_in.proj.weight")
    if pt != 1:
        raise ConversionError(f"{where}: 'img_in.proj.weight' has temporal patch {pt}; WorldDiT needs 1 "
                              f"(per-latent noise levels, actions and cameras)")
    out_dim = r.shape("final_layer.linear.weight")[0]
    if out_dim % (ph * pw):
        raise ConversionError(f"{where}: 'final_layer.linear.weight' out dim {out_dim} is not a multiple of the patch {ph}x{pw}")
    C = out_dim // (ph * pw)
    if cin not in (C, 2 * C + 1):
        raise ConversionError(f"{where}: 'img_in.proj.weight' takes {cin} channels; expected {2 * C + 1} "
                              f"(noisy {C} + condition {C} + mask 1) or {C}")
    depth = _count(keys, r"double_blocks\.(\d+)\.")
    if depth == 0:
        raise ConversionError(f"{where}: no 'double_blocks.*' keys: not a HunyuanVideo-1.5 transformer")
    qk_norm = r.has("double_blocks.0.img_attn_q_norm.weight")
    heads = config.get("heads_num") or config.get("num_attention_heads")
    if qk_norm:
        head_dim = r.shape("double_blocks.0.img_attn_q_norm.weight")[0]
        if heads and heads * head_dim != D:
            raise ConversionError(f"{where}: config says {heads} heads but q-norm width {head_dim} x {heads} != hidden {D}")
        heads = D // head_dim
    elif not heads:
        raise ConversionError(f"{where}: no q-norm weights to read the head width from; pass the checkpoint's config.json")
    head_dim = D // heads
    rope = config.get("rope_dim_list") or config.get("rope_axes_dim")
    if rope is None:
        if head_dim != 128:
            raise ConversionError(f"{where}: head_dim {head_dim}: pass the config.json with its RoPE dims (rope_dim_list)")
        rope = [16, 56, 56]
    qkv_bias = r.has("double_blocks.0.img_attn_q.bias")
    if not qkv_bias:
        raise ConversionError(f"{where}: 'double_blocks.0.img_attn_q.bias' is missing: checkpoints without q/k/v (and "
                              f"output projection) biases are not supported")
    mlp = r.shape("double_blocks.0.img_mlp.fc1.weight")[0]
    text_dim = r.shape("txt_in.input_embedder.weight")[1] if r.has("txt_in.input_embedder.weight") else 0
    vision_dim = r.shape("vision_in.proj.0.weight")[0] if r.has("vision_in.proj.0.weight") else 0
    byt5_dim = r.shape("byt5_in.layernorm.weight")[0] if r.has("byt5_in.layernorm.weight") else 0
    byt5_hidden = r.shape("byt5_in.fc1.weight")[0] if byt5_dim else 2048
    if byt5_dim and r.shape("byt5_in.fc2.weight")[0] != byt5_hidden:
        raise ConversionError(f"{where}: 'byt5_in.fc2.weight' {list(r.shape('byt5_in.fc2.weight'))}: the glyph "
                              f"mapper's two hidden widths differ ({byt5_hidden}); WorldDiT's GlyphMapper has one")
    if vision_dim and r.shape("vision_in.proj.1.weight") != (vision_dim, vision_dim):
        raise ConversionError(f"{where}: 'vision_in.proj.1.weight' {list(r.shape('vision_in.proj.1.weight'))}: expected "
                              f"[{vision_dim}, {vision_dim}]")
    return WorldDiTConfig(
        latent_channels=C, i2v=cin == 2 * C + 1, hidden=D, depth=depth, heads=heads, head_dim=head_dim,
        mlp_ratio=mlp / D, patch=[1, ph, pw], rope_dims=[int(x) for x in rope],
        rope_theta=float(config.get("rope_theta", 256.0)), text_dim=text_dim,
        text_refiner_depth=_count(keys, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
        action=r.has("action_in.mlp.0.weight"), camera=r.has("double_blocks.0.img_attn_prope_proj.weight"),
        qk_norm=qk_norm, qkv_bias=qkv_bias, prediction="v",
        vision_dim=vision_dim, vision_tokens=vision_tokens if vision_dim else 729,
        byt5_dim=byt5_dim, byt5_tokens=byt5_tokens if byt5_dim else 256, byt5_hidden=byt5_hidden,
        cond_type_embed=r.has("cond_type_embedding.weight"), text_refiner_time=r.has("txt_in.t_embedder.mlp.0.weight"),
        text_sigma=text_sigma, text_attends_video=text_attends_video,
    )


def official_to_worlddit(state: Mapping[str, Tensor], cfg: WorldDiTConfig, where: str = "checkpoint") -> dict[str, Tensor]:
    """WorldDiT state dict from an official-layout state dict (every key consumed, every shape checked)."""
    return apply_rules(official_rules(cfg), state, to_worlddit=True, cfg=cfg, where=where)


def worlddit_to_official(state: Mapping[str, Tensor], cfg: WorldDiTConfig, where: str = "WorldDiT state") -> dict[str, Tensor]:
    """The official layout of a WorldDiT state dict (the exact inverse of :func:`official_to_worlddit`)."""
    return apply_rules(official_rules(cfg), state, to_worlddit=False, cfg=cfg, where=where)


def read_official(path: str | Path) -> tuple[Mapping[str, Tensor], dict[str, Any]]:
    """(lazy state, config.json or {}) of an official transformer directory (``transformer/480p_i2v``) or one
    ``.safetensors`` file (a ``config.json`` beside it is read when present)."""
    path = Path(path)
    state = open_safetensors(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    return state, config
