"""HunyuanVideo-1.5's text, glyph and image encoders -> a precomputed streams file for the ``precomputed`` encoder.

The released models read three token streams (research/worldplay.md §2.1): Qwen2.5-VL-7B hidden states of the
prompt in HunyuanVideo-1.5's template (3584 wide, up to 1000 tokens after the template), ByT5 (Glyph-SDXL-v2)
tokens of the text the prompt quotes (1472 wide, up to 256), and SigLIP tokens of the conditioning image
(729 x 1152). This command runs those encoders once, with diffusers' own HunyuanVideo-1.5 encoding functions
(so prompts are templated, cropped and glyph-extracted exactly as the released pipeline does), and writes
what they produce with :func:`models.text_encoders.save_precomputed_streams`. Training and inference then
need only the DiT and the VAE on the GPU.

    # one prompt (and the negative prompt, for CFG) with the start image, next to a converted bundle:
    python -m models.convert embeddings --encoders /models/HunyuanVideo-1.5-480p_i2v \\
        --prompt "a walk through a quiet town" --prompt "" --image start.png \\
        --out outputs/worldplay_ar/text_embeddings.safetensors
    # every caption of a dataset and the first frame of every clip:
    python -m models.convert embeddings --encoders ... --data outputs/data/mine --out outputs/data/mine/text.safetensors

``--encoders`` is a diffusers HunyuanVideo-1.5 pipeline directory (``text_encoder``, ``tokenizer``,
``text_encoder_2``, ``tokenizer_2``, ``image_encoder``, ``feature_extractor``; the transformer and VAE are not
read). Image tokens are stored under :func:`models.text_encoders.image_key` of the uint8 frame as given
(``--image`` files as decoded, ``--data`` first frames as stored), and looked up with
``PrecomputedTextEncoder.encode(prompts, images=[frame, ...])``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from models.text_encoders import StreamLayout, image_key, save_precomputed_streams

__all__ = ["StreamEncoders", "HunyuanEncoders", "precompute_streams", "dataset_captions_and_frames", "main"]

HY15_LAYOUT = StreamLayout(llm_dim=3584, byt5_dim=1472, vision_dim=1152, byt5_tokens=256, vision_tokens=729)


class StreamEncoders(Protocol):
    """What :func:`precompute_streams` needs: valid tokens per prompt and per image."""

    layout: StreamLayout

    def text(self, prompts: list[str]) -> list[tuple[Tensor, Optional[Tensor]]]:
        """Per prompt: (LLM tokens [L, llm_dim], ByT5 tokens [G, byt5_dim] or None when the prompt quotes no text)."""

    def vision(self, images: list[np.ndarray]) -> list[Tensor]:
        """Per uint8 [H, W, 3] image: SigLIP tokens [vision_tokens, vision_dim]."""


class HunyuanEncoders:
    """The released encoders, loaded from a diffusers HunyuanVideo-1.5 pipeline directory (local files only)."""

    layout = HY15_LAYOUT

    def __init__(self, root: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 with_images: bool = True):
        import transformers

        root = Path(root).expanduser()
        for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") + (("image_encoder", "feature_extractor") if with_images else ()):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root}: no {sub}/ (expected a diffusers HunyuanVideo-1.5 pipeline directory)")
        self.device = torch.device(device)
        kw = {"local_files_only": True}
        self.text_encoder = transformers.Qwen2_5_VLTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **kw).to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", **kw)
        self.text_encoder_2 = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=dtype, **kw).to(self.device).eval()
        self.tokenizer_2 = transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2", **kw)
        self.image_encoder = self.feature_extractor = None
        if with_images:
            self.image_encoder = transformers.SiglipVisionModel.from_pretrained(root / "image_encoder", dtype=dtype, **kw).to(self.device).eval()
            self.feature_extractor = transformers.SiglipImageProcessor.from_pretrained(root / "feature_extractor", **kw)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> list[tuple[Tensor, Optional[Tensor]]]:
        from diffusers import HunyuanVideo15ImageToVideoPipeline as P

        llm, llm_mask = P._get_mllm_prompt_embeds(self.text_encoder, self.tokenizer, prompts, self.device,
                                                  tokenizer_max_length=1000)
        byt5, byt5_mask = P._get_byt5_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts, self.device,
                                                    tokenizer_max_length=self.layout.byt5_tokens)
        out = []
        for i in range(len(prompts)):
            g = byt5[i][byt5_mask[i].bool()]
            out.append((llm[i][llm_mask[i].bool()].float().cpu(), g.float().cpu() if g.shape[0] else None))
        return out

    @torch.no_grad()
    def vision(self, images: list[np.ndarray]) -> list[Tensor]:
        from PIL import Image

        from diffusers import HunyuanVideo15ImageToVideoPipeline as P

        if self.image_encoder is None:
            raise RuntimeError("HunyuanEncoders: built with with_images=False")
        return [P._get_image_embeds(self.image_encoder, self.feature_extractor, Image.fromarray(img), self.device)[0].float().cpu()
                for img in images]


def precompute_streams(encoders: StreamEncoders, prompts: Sequence[str], images: Sequence[np.ndarray], out: str | Path,
                       *, batch_size: int = 4, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Encode the distinct ``prompts`` and ``images`` and write one streams file (tokens stored in ``dtype``)."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError("precompute_streams: no prompts (pass --prompt, or --data with captioned clips)")
    texts = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        texts.update(zip(chunk, encoders.text(chunk)))
    vision: dict[str, Tensor] = {}
    pending = {image_key(img): img for img in images}
    keys = list(pending)
    for i in range(0, len(keys), batch_size):
        chunk = keys[i:i + batch_size]
        vision.update(zip(chunk, encoders.vision([pending[k] for k in chunk])))
    return save_precomputed_streams(out, texts, vision, encoders.layout, dtype=dtype)


def dataset_captions_and_frames(data: str | Path, frames: bool = True) -> tuple[list[str], list[np.ndarray]]:
    """Every clip's caption and (``frames``) first frame (uint8 [H, W, 3]) of a dataset directory or shard list."""
    from data.shards import iter_clips

    captions, firsts = [], []
    for clip in iter_clips(data, split_by_worker=False):
        captions.append(str(clip["caption"]))
        if frames:
            firsts.append(np.ascontiguousarray(np.asarray(clip["video"][0], dtype=np.uint8)))
    return captions, firsts


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoders", required=True, help="diffusers HunyuanVideo-1.5 pipeline directory (text_encoder/, "
                                                     "tokenizer/, text_encoder_2/, tokenizer_2/, image_encoder/, feature_extractor/)")
    p.add_argument("--out", required=True, help="the .safetensors streams file to write")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to encode (repeat; include the negative prompt, often \"\")")
    p.add_argument("--image", action="append", default=[], help="a conditioning image whose SigLIP tokens to store (repeat)")
    p.add_argument("--data", default=None, help="a dataset directory: encode every caption and every clip's first frame")
    p.add_argument("--no-images", action="store_true", help="skip the SigLIP tokens (and the image encoder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="encoder dtype and stored dtype")
    p.add_argument("--batch-size", type=int, default=4)


def run(a: argparse.Namespace, encoders: Optional[StreamEncoders] = None) -> Path:
    """The ``embeddings`` command; ``encoders`` replaces the released ones (tests)."""
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    prompts, images = list(a.prompt), [_load_image(p) for p in a.image]
    if a.data:
        caps, firsts = dataset_captions_and_frames(a.data, frames=not a.no_images)
        prompts += caps
        images += firsts
    if a.no_images:
        images = []
    if encoders is None:
        encoders = HunyuanEncoders(a.encoders, a.device, dtype, with_images=bool(images))
    path = precompute_streams(encoders, prompts, images, a.out, batch_size=a.batch_size, dtype=dtype)
    print(f"wrote {path}: {len(set(prompts))} prompts, {len({image_key(i) for i in images})} images")
    return path


def main(argv: Optional[list[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
