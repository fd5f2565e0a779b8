"""``python -m models.convert``: released HunyuanVideo-1.5 / HY-WorldPlay checkpoints in and out of WorldDiT bundles.

    # HY-WorldPlay action checkpoints -> bundles (kind read from the directory name)
    python -m models.convert worldplay /models/HY-WorldPlay/ar_distilled_action_model --out outputs/worldplay_distilled \\
        --vae /models/HunyuanVideo-1.5-480p_i2v/vae
    # HunyuanVideo-1.5 itself: the official transformer/480p_i2v directory, or diffusers' transformer directory
    python -m models.convert hunyuan /models/HunyuanVideo-1.5/transformer/480p_i2v --out outputs/hy15 --vae ...
    python -m models.convert diffusers /models/HunyuanVideo-1.5-480p_i2v --out outputs/hy15 --vae ...
    # a bundle (e.g. after LoRA fine-tuning) -> WorldPlay's layout, for its generate.py --action_ckpt
    python -m models.convert export-worldplay outputs/lora/<run>/export/bundle --out outputs/worldplay_export
    # the text / glyph / image embeddings the bundles read (models/convert/embeddings.py)
    python -m models.convert embeddings --encoders /models/HunyuanVideo-1.5-480p_i2v --prompt "..." --prompt "" \\
        --image start.png --out outputs/worldplay_distilled/text_embeddings.safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from models.convert import embeddings
from models.convert.common import ConversionError

_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKLHunyuanVideo15 directory (or a pipeline root with vae/)")
    p.add_argument("--text-embeddings", default=None,
                   help="precomputed streams file (default: text_embeddings.safetensors inside the bundle)")
    p.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="weights dtype in the bundle")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--vision-tokens", type=int, default=729, help="SigLIP slots of the packed text input")
    p.add_argument("--byt5-tokens", type=int, default=256, help="ByT5 slots of the packed text input")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worldplay", help="a HY-WorldPlay action checkpoint -> a bundle")
    w.add_argument("source", help="ar_model / ar_rl_model / ar_distilled_action_model / bidirectional_model directory or its .safetensors")
    w.add_argument("--kind", default=None, choices=["ar", "ar_rl", "distilled", "bidirectional"],
                   help="default: from the directory name")
    w.add_argument("--config-json", default=None, help="HunyuanVideo-1.5's transformer/480p_i2v/config.json (optional)")
    _common(w)
    for name, what in (("hunyuan", "the official HunyuanVideo-1.5 transformer (transformer/480p_i2v directory or file)"),
                       ("diffusers", "a diffusers HunyuanVideo15Transformer3DModel directory (or its pipeline root)")):
        h = sub.add_parser(name, help=f"{what} -> a bundle")
        h.add_argument("source")
        h.add_argument("--no-worldplay-branches", action="store_true",
                       help="do not add WorldPlay's zero-initialised action embedder and PRoPE projections")
        _common(h)
    e = sub.add_parser("export-worldplay", help="a bundle -> HY-WorldPlay's checkpoint layout")
    e.add_argument("bundle")
    e.add_argument("--out", required=True, help="directory for diffusion_pytorch_model.safetensors")
    e.add_argument("--weights", default="model", choices=["model", "raw"], help="EMA (model) or raw weights")
    e.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))
    e.add_argument("--overwrite", action="store_true")
    embeddings.add_arguments(sub.add_parser("embeddings", help="precompute LLM + ByT5 + SigLIP embeddings"))
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from models.convert.worldplay import convert_official, convert_worldplay, export_worldplay

    a = parse_args(argv)
    try:
        if a.command == "worldplay":
            out = convert_worldplay(a.source, a.out, kind=a.kind, vae=a.vae, text_embeddings=a.text_embeddings,
                                    config_json=a.config_json, dtype=_DTYPES[a.dtype], overwrite=a.overwrite,
                                    vision_tokens=a.vision_tokens, byt5_tokens=a.byt5_tokens)
        elif a.command in ("hunyuan", "diffusers"):
            out = convert_official(a.source, a.out, fmt=a.command, vae=a.vae, text_embeddings=a.text_embeddings,
                                   worldplay_branches=not a.no_worldplay_branches, dtype=_DTYPES[a.dtype],
                                   overwrite=a.overwrite, vision_tokens=a.vision_tokens, byt5_tokens=a.byt5_tokens)
        elif a.command == "export-worldplay":
            out = export_worldplay(a.bundle, a.out, weights=a.weights, dtype=_DTYPES[a.dtype], overwrite=a.overwrite)
        else:
            out = embeddings.run(a)
            return 0
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"models.convert {a.command}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if a.command != "export-worldplay" and a.command != "embeddings":
        if a.vae is None:
            print("  note: no --vae given; set the bundle's autoencoder.path to a diffusers HunyuanVideo-1.5 VAE "
                  "directory before running it", file=sys.stderr)
        if a.text_embeddings is None:
            print(f"  note: write the prompt embeddings to {out}/text_embeddings.safetensors with "
                  f"`python -m models.convert embeddings ...`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
