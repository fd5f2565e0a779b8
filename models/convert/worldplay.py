"""HY-WorldPlay action checkpoints <-> WorldDiT bundles, and HunyuanVideo-1.5 transformers -> bundles.

WorldPlay ships full transformer state dicts in HunyuanVideo-1.5's layout plus ``action_in.*`` (the discrete
action embedder) and ``double_blocks.{i}.img_attn_prope_proj.*`` (the PRoPE branch's output projection), one
per model (tencent/HY-WorldPlay on the Hub, each a ``diffusion_pytorch_model.safetensors``):

==============================  ===============  ===============================================================
checkpoint directory            ``kind``         sampling section of the converted bundle (WorldPlay's settings)
==============================  ===============  ===============================================================
``ar_model``                    ``ar``           AR chunks of 4 latents, 50 Euler steps, shift 5, CFG 6
``ar_rl_model``                 ``ar_rl``        same as ``ar`` (the model after WorldCompass RL)
``ar_distilled_action_model``   ``distilled``    AR chunks of 4, the 4-step schedule (= 4 Euler steps, shift 5),
                                                 no re-noising, no CFG
``bidirectional_model``         ``bidirectional``  windows of 16 latents, 50 Euler steps, shift 5, CFG 6
==============================  ===============  ===============================================================

All of them: context memory of 20 latents (12 recent + the first chunk + 1 retrieved chunk), context tagged
with timestep 14 (sigma 0.014), the context encoded with full attention when the cache is filled, CFG that
drops only the text (WorldPlay keeps actions and cameras in its unconditional branch), 480x832, 24 fps.

The AR models run their text stream at timestep 0 with text-only attention (cached once per prompt); the
bidirectional model runs HunyuanVideo-1.5's joint attention with the text at the window's timestep
(``text_sigma="video"``, ``text_attends_video=True``), so its converted config differs in those two fields.

Export (:func:`export_worldplay`) writes a bundle's weights back in this layout, so WorldPlay's own
``generate.py --action_ckpt`` (``load_state_dict(strict=True)``) runs a model fine-tuned here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from models.config import WorldDiTConfig
from models.convert.common import (
    ConversionError,
    LazyState,
    PathLike,
    cast_state,
    expected_shapes,
    write_bundle,
)
from models.convert.hunyuan import config_from_official, official_to_worlddit, read_official, worlddit_to_official

__all__ = [
    "KINDS",
    "guess_kind",
    "worldplay_sampling",
    "bundle_sections",
    "convert_official",
    "convert_worldplay",
    "add_worldplay_branches",
    "export_worldplay",
]

KINDS = ("ar", "ar_rl", "distilled", "bidirectional")
_DIR_KINDS = {"ar_model": "ar", "ar_rl_model": "ar_rl", "ar_distilled_action_model": "distilled",
              "bidirectional_model": "bidirectional"}
VIDEO = {"height": 480, "width": 832, "fps": 24.0}
CONTEXT_SIGMA = 0.014  # WorldPlay tags its clean context with timestep stabilization_level - 1 = 14
LLM_TOKENS = 1000  # HunyuanVideo-1.5 keeps up to 1000 LLM tokens after its prompt template


def guess_kind(path: PathLike) -> str:
    """The WorldPlay checkpoint kind from its directory name (``ar_model`` -> ``ar``, ...); ValueError if unknown."""
    for part in reversed(Path(path).resolve().parts):
        if part in _DIR_KINDS:
            return _DIR_KINDS[part]
    raise ValueError(f"{path}: cannot tell the WorldPlay checkpoint kind from its path; pass kind "
                     f"(one of {KINDS}: ar_model, ar_rl_model, ar_distilled_action_model, bidirectional_model)")


def worldplay_sampling(kind: str, *, height: int = VIDEO["height"], width: int = VIDEO["width"]) -> dict[str, Any]:
    """The bundle ``sampling`` section that samples like WorldPlay's released inference for ``kind``."""
    from models.memory import MemoryConfig
    from models.rollout import RolloutConfig

    if kind not in KINDS + ("base",):
        raise ValueError(f"unknown WorldPlay kind {kind!r}; expected one of {KINDS}")
    common = dict(chunk_size=4, shift=5.0, context_sigma=CONTEXT_SIGMA, context_causal=False, uncond_text=True,
                  uncond_actions=False, uncond_cameras=False, memory=MemoryConfig())
    if kind == "distilled":
        rc = RolloutConfig(steps=4, schedule="distilled", renoise=False, guidance=1.0, mode="ar", **common)
    elif kind in ("bidirectional", "base"):
        rc = RolloutConfig(steps=50, schedule="euler", guidance=6.0, mode="window", window_latents=16, **common)
    else:
        rc = RolloutConfig(steps=50, schedule="euler", guidance=6.0, mode="ar", **common)
    section = dataclasses.asdict(rc)
    section.update(height=height, width=width, fps=VIDEO["fps"], negative_prompt="",
                   model_type="bidirectional" if kind in ("bidirectional", "base") else "ar")
    return section


def bundle_sections(vae: Optional[PathLike], text_embeddings: Optional[PathLike],
                    vae_dtype: str = "float32") -> tuple[dict[str, Any], dict[str, Any]]:
    """(autoencoder, text_encoder) sections: HunyuanVideo-1.5's VAE (a diffusers ``AutoencoderKLHunyuanVideo15``
    directory) and precomputed LLM + ByT5 + SigLIP embeddings (models/convert/embeddings.py; default
    ``text_embeddings.safetensors`` inside the bundle)."""
    ae = {"kind": "hunyuan15", "path": None if vae is None else str(Path(vae).expanduser().resolve()), "dtype": vae_dtype}
    te = {"kind": "precomputed", "max_length": LLM_TOKENS,
          "path": "text_embeddings.safetensors" if text_embeddings is None else str(Path(text_embeddings).expanduser().resolve())}
    return ae, te


def add_worldplay_branches(state: dict[str, Tensor], cfg: WorldDiTConfig, seed: int = 0) -> WorldDiTConfig:
    """Give a converted HunyuanVideo-1.5 the action embedder and PRoPE projections WorldPlay adds, initialised as
    WorldPlay does (last action layer and every PRoPE projection zero), so the function is unchanged; returns
    the new config (``state`` gains the parameters in place, in the dtype of the existing weights)."""
    if cfg.action and cfg.camera:
        return cfg
    new = dataclasses.replace(cfg, action=True, camera=True, patch=list(cfg.patch), rope_dims=list(cfg.rope_dims))
    shapes = expected_shapes(new)
    dtype = state["time_embed.mlp.0.weight"].dtype
    g = torch.Generator().manual_seed(seed)
    for k in sorted(set(shapes) - set(state)):
        if k == "action_embed.mlp.0.weight":
            state[k] = (0.02 * torch.randn(shapes[k], generator=g)).to(dtype)
        elif k.startswith("action_embed.") or k.endswith("prope_proj.weight") or k.endswith("prope_proj.bias"):
            state[k] = torch.zeros(shapes[k], dtype=dtype)
        else:
            raise ConversionError(f"add_worldplay_branches: unexpected new parameter '{k}'")
    return new


def _meta(source: PathLike, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"stage": "convert", "parent": None, "data": None,
            "source": {"path": str(Path(source).resolve()), "format": fmt, **extra}}


def convert_official(source: PathLike, out: PathLike, *, fmt: str = "hunyuan", vae: Optional[PathLike] = None,
                     text_embeddings: Optional[PathLike] = None, worldplay_branches: bool = True,
                     dtype: Optional[torch.dtype] = None, overwrite: bool = False, vision_tokens: int = 729,
                     byt5_tokens: int = 256) -> Path:
    """A HunyuanVideo-1.5 transformer (``fmt`` "hunyuan": the official ``transformer/480p_i2v`` directory or file;
    "diffusers": a diffusers transformer directory) -> a WorldDiT bundle.

    The model keeps HunyuanVideo-1.5's arithmetic (joint text attention, text modulated at the video's
    timestep); ``worldplay_branches`` adds WorldPlay's zero-initialised action and PRoPE branches, ready for
    action fine-tuning. Sampling: WorldPlay's bidirectional settings (windows of 16 latents, 50 steps, CFG 6).
    ``vision_tokens`` / ``byt5_tokens``: slots of the packed text input (SigLIP's 729, ByT5's 256).
    """
    if fmt == "diffusers":
        from models.convert.diffusers import config_for_official, diffusers_to_official, read_diffusers

        raw, config = read_diffusers(source)
        state: Mapping[str, Tensor] = diffusers_to_official(raw, where=str(source))
        config = config_for_official(config, f"{source}/config.json")
    elif fmt == "hunyuan":
        state, config = read_official(source)
    else:
        raise ValueError(f"convert_official: fmt must be 'hunyuan' or 'diffusers', got {fmt!r}")
    cfg = config_from_official(state, config, text_sigma="video", text_attends_video=True, where=str(source),
                               vision_tokens=vision_tokens, byt5_tokens=byt5_tokens)
    if cfg.action or cfg.camera:
        raise ConversionError(f"{source}: has WorldPlay's action/PRoPE parameters; convert it with "
                              f"`python -m models.convert worldplay` instead")
    weights = official_to_worlddit(state, cfg, where=str(source))
    del state
    if worldplay_branches:
        cfg = add_worldplay_branches(weights, cfg)
    cast_state(weights, dtype)
    ae, te = bundle_sections(vae, text_embeddings)
    return write_bundle(out, weights, cfg, autoencoder=ae, text_encoder=te, sampling=worldplay_sampling("base"),
                        meta=_meta(source, f"hunyuanvideo-1.5/{fmt}", worldplay_branches=worldplay_branches),
                        overwrite=overwrite)


def convert_worldplay(source: PathLike, out: PathLike, *, kind: Optional[str] = None, vae: Optional[PathLike] = None,
                      text_embeddings: Optional[PathLike] = None, config_json: Optional[PathLike] = None,
                      dtype: Optional[torch.dtype] = None, overwrite: bool = False, vision_tokens: int = 729,
                      byt5_tokens: int = 256) -> Path:
    """A WorldPlay action checkpoint (its directory or ``diffusion_pytorch_model.safetensors``) -> a bundle whose
    sampling section is WorldPlay's for ``kind`` (default: read from the directory name)."""
    kind = kind or guess_kind(source)
    if kind not in KINDS:
        raise ValueError(f"convert_worldplay: kind must be one of {KINDS}, got {kind!r}")
    state, config = read_official(source)
    if config_json is not None:
        config = json.loads(Path(config_json).read_text())
    for key in ("action_in.mlp.0.weight", "double_blocks.0.img_attn_prope_proj.weight"):
        if key not in state:
            raise ConversionError(f"{source}: missing key '{key}': not a WorldPlay action checkpoint (for "
                                  f"HunyuanVideo-1.5 itself use `python -m models.convert hunyuan`)")
    bi = kind == "bidirectional"
    cfg = config_from_official(state, config, text_sigma="video" if bi else "zero", text_attends_video=bi,
                               where=str(source), vision_tokens=vision_tokens, byt5_tokens=byt5_tokens)
    weights = cast_state(official_to_worlddit(state, cfg, where=str(source)), dtype)
    del state
    ae, te = bundle_sections(vae, text_embeddings)
    return write_bundle(out, weights, cfg, autoencoder=ae, text_encoder=te, sampling=worldplay_sampling(kind),
                        meta=_meta(source, "hy-worldplay", kind=kind), overwrite=overwrite)


# The streams WorldPlay's transformer always has; a bundle without them cannot be written in its layout.
_REQUIRED = (("action", "the action embedder (action_in)"), ("camera", "the PRoPE projections (img_attn_prope_proj)"),
             ("vision_dim", "the SigLIP projection (vision_in)"), ("byt5_dim", "the ByT5 glyph mapper (byt5_in)"),
             ("cond_type_embed", "the stream-type embedding (cond_type_embedding)"),
             ("text_refiner_time", "the refiner's timestep MLP (txt_in.t_embedder)"))


def export_worldplay(bundle: PathLike, out: PathLike, *, weights: str = "model", dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False) -> Path:
    """Write a bundle's weights in HY-WorldPlay's checkpoint layout: ``out/diffusion_pytorch_model.safetensors``
    (for ``generate.py --action_ckpt``) and ``out/worldsmith_export.json`` (where it came from, which flags to
    run it with). ``weights``: "model" (EMA where kept) or "raw". Returns the checkpoint file's path."""
    from safetensors.torch import save_file

    from models.bundle import RAW_WEIGHTS, WEIGHTS, _structured, read_bundle_config, read_bundle_meta

    bundle, out = Path(bundle), Path(out)
    config = read_bundle_config(bundle)
    cfg = _structured(WorldDiTConfig, config["model"], f"bundle {bundle}: config.yaml section 'model'")
    lacking = [what for field, what in _REQUIRED if not getattr(cfg, field)]
    if lacking:
        raise ConversionError(f"bundle {bundle}: WorldPlay's layout needs {', '.join(lacking)}, which this model "
                              f"lacks (only bundles converted from HunyuanVideo-1.5 / WorldPlay can be exported)")
    if cfg.prediction != "v":
        raise ConversionError(f"bundle {bundle}: prediction={cfg.prediction!r}; WorldPlay's samplers read the output "
                              f"as a velocity (prediction 'v')")
    name = {"model": WEIGHTS, "raw": RAW_WEIGHTS}[weights]
    state = LazyState([bundle / name])
    official = cast_state(worlddit_to_official(state, cfg, where=f"bundle {bundle}/{name}"), dtype)
    target = out / "diffusion_pytorch_model.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file({k: v.contiguous() for k, v in official.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    sampling = config.get("sampling", {})
    model_type = "bi" if sampling.get("model_type") == "bidirectional" else "ar"
    flags = f"--action_ckpt {target} --model_type {model_type}"
    if sampling.get("schedule") == "distilled":
        flags += " --few_step true --num_inference_steps 4"
    info = {"bundle": str(bundle.resolve()), "weights": name, "bundle_meta": read_bundle_meta(bundle),
            "text_mode": {"text_sigma": cfg.text_sigma, "text_attends_video": cfg.text_attends_video},
            "generate_flags": flags, "tensors": len(official)}
    if cfg.text_attends_video != (model_type == "bi"):
        info["warning"] = ("the model's text arithmetic does not match WorldPlay's pipeline for --model_type "
                           f"{model_type} (AR runs text-only attention at timestep 0, bi joint attention)")
    (out / "worldsmith_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return target
