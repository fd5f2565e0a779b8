"""Released HunyuanVideo-1.5 / HY-WorldPlay checkpoints in and out of WorldDiT (models/convert), with numerical parity.

* diffusers' ``HunyuanVideo15Transformer3DModel`` (random weights, reduced width/depth) -> convert -> the same
  raw output (velocity) in fp32 on the same latents, timesteps, text, glyph and image tokens;
* a random checkpoint in HY-WorldPlay's action layout (tests/hy15_reference.py: built from the published
  module names) -> convert -> the same output as a reference forward written from the official arithmetic,
  for the bidirectional model (joint attention, PRoPE, actions) and the AR model (text cache at t = 0,
  context K/V cache, a chunk attending to both);
* WorldDiT -> WorldPlay layout -> WorldDiT bit-exact; every key consumed, errors that name the key.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import hy15_reference as ref  # noqa: E402

from models.bundle import load_bundle, read_bundle_config  # noqa: E402
from models.config import WorldDiTConfig, preset  # noqa: E402
from models.convert import ConversionError  # noqa: E402
from models.convert.__main__ import main as convert_main  # noqa: E402
from models.convert.common import apply_rules, expected_shapes  # noqa: E402
from models.convert.hunyuan import config_from_official, official_rules, official_to_worlddit  # noqa: E402
from models.dit import WorldDiT  # noqa: E402
from models.text_encoders import (  # noqa: E402
    PrecomputedTextEncoder,
    StreamLayout,
    image_key,
    pack_text_streams,
    save_precomputed_streams,
)

V_TOK, G_TOK = 5, 6  # vision / glyph slots of the reduced models
ATOL = 2e-5  # fp32; outputs are O(1)
SLOTS = ["--vision-tokens", str(V_TOK), "--byt5-tokens", str(G_TOK)]
# the official config.json fields the reduced checkpoints need (head_dim 16 has no default RoPE split)
OFFICIAL_CONFIG = {"heads_num": 2, "rope_dim_list": [4, 6, 6], "rope_theta": 256, "mm_single_blocks_depth": 0}


def _rand_cameras(g: torch.Generator, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rigid w2c [B, T, 4, 4] and normalised intrinsics [B, T, 3, 3]."""
    q, _ = torch.linalg.qr(torch.randn(B, T, 3, 3, generator=g))
    w2c = torch.eye(4).repeat(B, T, 1, 1)
    w2c[..., :3, :3] = q * torch.sign(torch.det(q))[..., None, None]
    w2c[..., :3, 3] = torch.randn(B, T, 3, generator=g)
    K = torch.zeros(B, T, 3, 3)
    K[..., 0, 0], K[..., 1, 1], K[..., 2, 2] = 0.8 + 0.2 * torch.rand(B, T, generator=g), 1.2, 1.0
    K[..., 0, 2] = K[..., 1, 2] = 0.5
    return w2c, K


def _streams(g: torch.Generator, B: int, L: int, d: ref.Dims, llm_valid: list[int], byt5_valid: list[int]):
    """Padded LLM / ByT5 / vision tokens with masks (as the official pipeline feeds them)."""
    llm = torch.randn(B, L, d.text_dim, generator=g)
    by = torch.randn(B, G_TOK, d.byt5_dim, generator=g)
    vis = torch.randn(B, V_TOK, d.vision_dim, generator=g)
    lm = torch.arange(L)[None] < torch.tensor(llm_valid)[:, None]
    bm = torch.arange(G_TOK)[None] < torch.tensor(byt5_valid)[:, None]
    return llm * lm[..., None], lm, by * bm[..., None], bm, vis


def _packed(d: ref.Dims, llm, lm, by, bm, vis, vision_valid: bool = True):
    """The same tokens in WorldDiT's packed text input (models/text_encoders.pack_text_streams)."""
    layout = StreamLayout(llm_dim=d.text_dim, byt5_dim=d.byt5_dim, vision_dim=d.vision_dim, byt5_tokens=G_TOK,
                          vision_tokens=V_TOK)
    B = llm.shape[0]
    return pack_text_streams([llm[b][lm[b]] for b in range(B)], [by[b][bm[b]] for b in range(B)],
                             [vis[b] if vision_valid else None for b in range(B)], layout)


def _x_in(x: torch.Tensor, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The official / diffusers 2C+1 channel input: [noisy, image where cond, mask]."""
    m = cond.float()[:, None, :, None, None]
    return torch.cat([x, img[:, :, None] * m, m.expand(-1, 1, -1, *x.shape[3:])], 1)


# ------------------------------------------------------------------------------------------ diffusers


def _diffusers_model(seed: int = 0):
    from diffusers import HunyuanVideo15Transformer3DModel

    d = ref.Dims()
    m = HunyuanVideo15Transformer3DModel(
        in_channels=2 * d.channels + 1, out_channels=d.channels, num_attention_heads=d.heads,
        attention_head_dim=d.hidden // d.heads, num_layers=d.depth, num_refiner_layers=d.refiner_depth,
        text_embed_dim=d.text_dim, text_embed_2_dim=d.byt5_dim, image_embed_dim=d.vision_dim, rope_axes_dim=d.rope)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return m.eval(), d


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    m, _ = _diffusers_model()
    path = tmp_path_factory.mktemp("hv15_diffusers") / "transformer"
    m.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("i2v", [True, False])
def test_diffusers_parity(diffusers_dir, tmp_path, i2v):
    """diffusers' transformer and the converted WorldDiT give the same velocity (fp32), I2V and T2V, with padding."""
    from diffusers import HunyuanVideo15Transformer3DModel

    dm = HunyuanVideo15Transformer3DModel.from_pretrained(str(diffusers_dir)).eval()
    d = ref.Dims()
    out = tmp_path / "bundle"
    assert convert_main(["diffusers", str(diffusers_dir.parent), "--out", str(out), *SLOTS]) == 0
    b = load_bundle(out, load_autoencoder=False, load_text_encoder=False)
    cfg = b.model.cfg
    assert (cfg.prediction, cfg.text_sigma, cfg.text_attends_video, cfg.action, cfg.camera) == ("v", "video", True, True, True)
    b.model.cfg.attn_backend = "masked"

    g = torch.Generator().manual_seed(1)
    B, C, T, H, W, L = 2, d.channels, 3, 4, 6, 7
    x, img = torch.randn(B, C, T, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    sigma = torch.tensor([0.75, 0.3125])
    llm, lm, by, bm, vis = _streams(g, B, L, d, llm_valid=[L, 4], byt5_valid=[3, 0])
    cond = torch.zeros(B, T, dtype=torch.bool)
    cond[:, 0] = i2v
    with torch.no_grad():
        expect = dm(_x_in(x, img, cond), sigma * 1000, llm, lm.long(), encoder_hidden_states_2=by,
                    encoder_attention_mask_2=bm.long(), image_embeds=vis if i2v else torch.zeros_like(vis)).sample
        text, mask = _packed(d, llm, lm, by, bm, vis, vision_valid=i2v)
        w2c, K = _rand_cameras(g, B, T)  # the added WorldPlay branches are zero: cameras and actions change nothing
        got = b.model(x, sigma[:, None].expand(B, T).contiguous(), text=text, text_mask=mask, image_latent=img,
                      cond_mask=cond, actions=torch.randint(0, 81, (B, T), generator=g), w2c=w2c, K=K)
    assert expect.abs().max() > 0.1
    torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)

    section = read_bundle_config(out)
    assert section["autoencoder"]["kind"] == "hunyuan15" and section["text_encoder"]["kind"] == "precomputed"
    assert section["sampling"]["shift"] == 5.0 and section["sampling"]["mode"] == "window"


def test_diffusers_unknown_key_and_meanflow_are_named(diffusers_dir, tmp_path):
    from models.convert.diffusers import config_for_official, diffusers_to_official

    sd = load_file(str(diffusers_dir / "diffusion_pytorch_model.safetensors"))
    sd["time_embed.timestep_embedder_r.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="time_embed.timestep_embedder_r.linear_1.weight"):
        diffusers_to_official(sd)
    with pytest.raises(ConversionError, match="use_meanflow"):
        config_for_official({"use_meanflow": True})


# ------------------------------------------------------------------------------------------ WorldPlay


@pytest.fixture(scope="module")
def wp_state():
    return ref.random_state(ref.Dims(), seed=3)


def _write_ckpt(root: Path, name: str, state: dict) -> Path:
    (root / name).mkdir(parents=True)
    path = root / name / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    (root / name / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return path


def _convert(tmp_path: Path, name: str, state: dict, *extra: str) -> Path:
    _write_ckpt(tmp_path, name, state)
    out = tmp_path / f"{name}_bundle"
    args = ["worldplay", str(tmp_path / name), "--out", str(out), "--vae", str(tmp_path / "vae"), *SLOTS] + list(extra)
    assert convert_main(args) == 0
    return out


def _video(g, d: ref.Dims, B: int, T: int, H: int, W: int, sigma: torch.Tensor, cond: torch.Tensor, positions):
    x = torch.randn(B, d.channels, T, H, W, generator=g)
    img = torch.randn(B, d.channels, H, W, generator=g)
    actions = torch.randint(0, 81, (B, T), generator=g)
    w2c, K = _rand_cameras(g, B, T)
    v = ref.Video(_x_in(x, img, cond), sigma * 1000, actions, w2c, K, list(positions))
    return x, img, actions, w2c, K, v


def test_worldplay_bidirectional_parity(wp_state, tmp_path):
    """bidirectional_model layout -> bundle: joint text attention at the window's timestep, PRoPE, actions, per-frame
    timesteps (context at t = 14), padded text: equal to the official arithmetic."""
    d = ref.Dims()
    out = _convert(tmp_path, "bidirectional_model", wp_state)
    b = load_bundle(out, load_autoencoder=False, load_text_encoder=False)
    b.model.cfg.attn_backend = "masked"
    assert (b.model.cfg.text_sigma, b.model.cfg.text_attends_video) == ("video", True)
    s = b.sampling
    assert (s["mode"], s["window_latents"], s["steps"], s["guidance"], s["context_sigma"]) == ("window", 16, 50, 6.0, 0.014)
    assert s["model_type"] == "bidirectional"

    g = torch.Generator().manual_seed(5)
    B, T, H, W, L = 2, 6, 3, 4, 7
    sigma = torch.tensor([[0.014] * 2 + [0.625] * 4, [0.014] * 2 + [0.9375] * 4])
    cond = torch.zeros(B, T, dtype=torch.bool)
    cond[:, 0] = True
    x, img, actions, w2c, K, v = _video(g, d, B, T, H, W, sigma, cond, range(T))
    llm, lm, by, bm, vis = _streams(g, B, L, d, llm_valid=[5, L], byt5_valid=[0, 4])
    t_txt = sigma.amax(1) * 1000
    with torch.no_grad():
        txt, tmask = ref.text_stream(wp_state, llm, lm, by, bm, vis, t_txt, d.heads)
        expect = ref.bidirectional_forward(wp_state, d, v, txt, tmask, t_txt)
        text, mask = _packed(d, llm, lm, by, bm, vis)
        got = b.model(x, sigma, actions=actions, w2c=w2c, K=K, text=text, text_mask=mask, image_latent=img, cond_mask=cond)
    assert expect.abs().max() > 0.1
    torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)
    cache = b.model.new_cache()
    with pytest.raises(ValueError, match="text stream depends on the video"):
        b.model.fill_text_cache(cache, text, mask)


def test_official_hunyuan_layout_converts_with_zero_worldplay_branches(wp_state, tmp_path):
    """The official transformer/480p_i2v layout (no action / PRoPE keys) -> ``hunyuan`` command: HunyuanVideo-1.5's
    arithmetic plus WorldPlay's branches initialised to change nothing (the reference with those keys zero)."""
    base = {k: v for k, v in wp_state.items() if not k.startswith("action_in.") and "prope" not in k}
    _write_ckpt(tmp_path, "480p_i2v", base)
    out = tmp_path / "hy15"
    assert convert_main(["hunyuan", str(tmp_path / "480p_i2v"), "--out", str(out), *SLOTS]) == 0
    b = load_bundle(out, load_autoencoder=False, load_text_encoder=False)
    b.model.cfg.attn_backend = "masked"
    assert b.model.cfg.action and b.model.cfg.camera and b.meta["source"]["worldplay_branches"]
    zeroed = dict(base, **{k: torch.zeros_like(v) for k, v in wp_state.items() if k not in base})
    d, g = ref.Dims(), torch.Generator().manual_seed(11)
    B, T, H, W, L = 2, 3, 3, 4, 5
    sigma = torch.tensor([[0.5] * T, [0.25] * T])
    cond = torch.zeros(B, T, dtype=torch.bool)
    cond[:, 0] = True
    x, img, actions, w2c, K, v = _video(g, d, B, T, H, W, sigma, cond, range(T))
    llm, lm, by, bm, vis = _streams(g, B, L, d, llm_valid=[L, 2], byt5_valid=[1, 0])
    with torch.no_grad():
        txt, tmask = ref.text_stream(zeroed, llm, lm, by, bm, vis, sigma[:, 0] * 1000, d.heads)
        expect = ref.bidirectional_forward(zeroed, d, v, txt, tmask, sigma[:, 0] * 1000)
        text, mask = _packed(d, llm, lm, by, bm, vis)
        got = b.model(x, sigma, actions=actions, w2c=w2c, K=K, text=text, text_mask=mask, image_latent=img, cond_mask=cond)
    torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)


def test_worldplay_ar_parity(wp_state, tmp_path):
    """ar_distilled_action_model layout -> bundle: WorldDiT's KV-cache path (text cache, context filled with full
    attention at sigma 0.014, a chunk at reframed positions) equals WorldPlay's AR inference arithmetic."""
    d = ref.Dims()
    out = _convert(tmp_path, "ar_distilled_action_model", wp_state, "--text-embeddings", str(tmp_path / "t.safetensors"))
    b = load_bundle(out, load_autoencoder=False, load_text_encoder=False)
    b.model.cfg.attn_backend = "masked"
    assert (b.model.cfg.text_sigma, b.model.cfg.text_attends_video) == ("zero", False)
    s = b.sampling
    assert (s["schedule"], s["renoise"], s["guidance"], s["chunk_size"], s["mode"]) == ("distilled", False, 1.0, 4, "ar")
    assert (s["shift"], s["context_causal"], s["uncond_actions"], s["uncond_cameras"]) == (5.0, False, False, False)
    assert s["memory"]["max_context"] == 20 and s["memory"]["temporal_latents"] == 12
    assert b.config["text_encoder"]["path"] == str((tmp_path / "t.safetensors").resolve())
    assert b.config["autoencoder"]["path"] == str((tmp_path / "vae").resolve())

    g = torch.Generator().manual_seed(7)
    M, T, H, W, L = 4, 4, 3, 4, 6
    cond_ctx = torch.tensor([[True, False, False, False]])
    ctx_sigma = torch.full((1, M), 0.014)
    xc, img, ac, wc, Kc, vc = _video(g, d, 1, M, H, W, ctx_sigma, cond_ctx, range(M))
    chunk_sigma = torch.full((1, T), 0.8333)
    no_img = torch.zeros(1, T, dtype=torch.bool)
    x, _, a, w2c, K, v = _video(g, d, 1, T, H, W, chunk_sigma, no_img, range(M, M + T))
    llm, lm, by, bm, vis = _streams(g, 1, L, d, llm_valid=[4], byt5_valid=[3])
    with torch.no_grad():
        txt, tmask = ref.text_stream(wp_state, llm, lm, by, bm, vis, torch.zeros(1), d.heads)
        expect = ref.ar_forward(wp_state, d, vc, v, txt[tmask][None])  # the official text cache drops padding
        text, mask = _packed(d, llm, lm, by, bm, vis)
        cache = b.model.fill_text_cache(b.model.new_cache(), text, mask)
        b.model.fill_context_cache(cache, x=xc, sigma=ctx_sigma, actions=ac, w2c=wc, K=Kc,
                                   t_pos=torch.arange(M)[None], image_latent=img, cond_mask=cond_ctx, causal=False)
        got = b.model(x, chunk_sigma, actions=a, w2c=w2c, K=K, t_pos=torch.arange(M, M + T)[None], cache=cache)
    assert expect.abs().max() > 0.1
    torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)


def test_roundtrip_worlddit_worldplay_worlddit_is_bit_exact(wp_state, tmp_path):
    """checkpoint -> bundle -> WorldPlay layout reproduces the checkpoint bit for bit; converting the export again
    gives the bundle's weights bit for bit (a fine-tuned bundle goes back unchanged)."""
    first = _convert(tmp_path, "ar_model", wp_state)
    # perturb the bundle's weights (as fine-tuning would) so the round trip is not just the identity on the input
    b1 = load_bundle(first, load_autoencoder=False, load_text_encoder=False)
    sd1 = {k: v + 0.01 * torch.randn_like(v) for k, v in b1.model.state_dict().items()}
    b1.model.load_state_dict(sd1)
    from models.bundle import save_bundle

    tuned = save_bundle(tmp_path / "tuned", b1.model, model_cfg=b1.model.cfg, autoencoder_cfg=b1.config["autoencoder"],
                        text_encoder_cfg=b1.config["text_encoder"], sampling=b1.sampling, meta={"stage": "lora"})
    assert convert_main(["export-worldplay", str(tuned), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(ref.official_shapes(ref.Dims()))  # exactly WorldPlay's strict key set
    assert all(tuple(exported[k].shape) == s for k, s in ref.official_shapes(ref.Dims()).items())
    back = _convert(tmp_path / "again", "ar_model", exported)
    sd2 = load_bundle(back, load_autoencoder=False, load_text_encoder=False).model.state_dict()
    assert set(sd2) == set(sd1) and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # and the untouched path: checkpoint -> bundle -> export is the checkpoint itself
    assert convert_main(["export-worldplay", str(first), "--out", str(tmp_path / "export0")]) == 0
    again = load_file(str(tmp_path / "export0" / "diffusion_pytorch_model.safetensors"))
    assert set(again) == set(wp_state) and all(torch.equal(again[k], wp_state[k]) for k in wp_state)
    info = (tmp_path / "export" / "worldsmith_export.json").read_text()
    assert "--model_type ar" in info


def test_errors_name_the_key(wp_state, tmp_path):
    d = ref.Dims()
    cfg = config_from_official(wp_state, OFFICIAL_CONFIG)
    broken = dict(wp_state)
    del broken["double_blocks.1.txt_attn_k.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'double_blocks\.1\.txt_attn_k\.bias'"):
        official_to_worlddit(broken, cfg)
    extra = dict(wp_state, **{"double_blocks.0.img_attn_extra.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"not consumed.*double_blocks\.0\.img_attn_extra\.weight"):
        official_to_worlddit(extra, cfg)
    bad = dict(wp_state, **{"double_blocks.0.img_mlp.fc1.weight": torch.zeros(d.hidden * 4, d.hidden + 1)})
    with pytest.raises(ConversionError, match=r"'double_blocks\.0\.img_mlp\.fc1\.weight' \[128, 33\].*expected \[128, 32\]"):
        official_to_worlddit(bad, cfg)
    with pytest.raises(ConversionError, match=r"single_blocks\.0\.linear1_q\.weight.*single-stream"):
        config_from_official(dict(wp_state, **{"single_blocks.0.linear1_q.weight": torch.zeros(1)}), OFFICIAL_CONFIG)
    base = {k: v for k, v in wp_state.items() if not k.startswith("action_in.") and "prope" not in k}
    _write_ckpt(tmp_path, "ar_model", base)
    assert convert_main(["worldplay", str(tmp_path / "ar_model"), "--out", str(tmp_path / "x")]) == 2  # named on stderr
    with pytest.raises(ConversionError, match="action_in.mlp.0.weight"):
        from models.convert.worldplay import convert_worldplay

        convert_worldplay(tmp_path / "ar_model", tmp_path / "y")
    # a bundle of one of our own presets has none of the released streams: export refuses, naming them
    from models.bundle import save_bundle

    tiny = save_bundle(tmp_path / "tiny", WorldDiT(preset("tiny")), model_cfg=preset("tiny"), autoencoder_cfg={"kind": "patch"},
                       text_encoder_cfg={"kind": "none"}, sampling={}, meta={})
    with pytest.raises(ConversionError, match="SigLIP projection.*ByT5 glyph mapper"):
        from models.convert.worldplay import export_worldplay

        export_worldplay(tiny, tmp_path / "e")


def test_full_size_layout_maps_onto_the_released_preset():
    """The real 480p_i2v + WorldPlay key set (on the meta device: no memory) reads as ``hy15_released`` with the
    WorldPlay branches, converts with every shape checked, and keeps the parameter count (8.33B + 0.23B)."""
    full = ref.Dims(hidden=2048, heads=16, depth=54, refiner_depth=2, channels=32, text_dim=3584, byt5_dim=1472,
                    byt5_hidden=2048, vision_dim=1152, rope=(16, 56, 56))
    state = {k: torch.empty(s, device="meta") for k, s in ref.official_shapes(full).items()}
    cfg = config_from_official(state, {})
    assert cfg == replace(preset("hy15_released"), rope_dims=[16, 56, 56])
    converted = official_to_worlddit(state, cfg)
    n = sum(t.numel() for t in converted.values())
    assert n == sum(t.numel() for t in state.values())
    worldplay = sum(t.numel() for k, t in state.items() if k.startswith("action_in.") or "prope" in k)
    assert abs((n - worldplay) - 8.33e9) < 0.01e9 and abs(worldplay - 0.2313e9) < 0.001e9, (n, worldplay)
    back = apply_rules(official_rules(cfg), converted, to_worlddit=False, cfg=cfg, where="meta")
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


def test_presets_build_none_of_the_new_modules():
    """Our presets (the streams are off) have exactly their old parameters."""
    for name in ("tiny", "small", "base", "hy15"):
        keys = expected_shapes(preset(name))
        assert not [k for k in keys if k.startswith(("vision_embed.", "byt5_embed.", "cond_type.", "text_embed.time."))]
    assert WorldDiTConfig().text_sigma == "zero" and not WorldDiTConfig().text_attends_video


# ------------------------------------------------------------------------------------------ embeddings


class _FakeEncoders:
    """Deterministic stand-ins for Qwen2.5-VL / ByT5 / SigLIP with the reduced widths (the file plumbing is tested,
    the released encoders are diffusers' own functions)."""

    layout = StreamLayout(llm_dim=24, byt5_dim=20, vision_dim=12, byt5_tokens=G_TOK, vision_tokens=V_TOK)

    def text(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(len(p) + 1)
            out.append((torch.randn(2 + len(p) % 5, 24, generator=g), torch.randn(3, 20, generator=g) if '"' in p else None))
        return out

    def vision(self, images):
        return [torch.full((V_TOK, 12), float(img.mean())) for img in images]


def test_precomputed_streams_pack_for_the_model(two_clips, tmp_path):
    """The embeddings command writes a streams file (captions of a dataset + its first frames + extra prompts); the
    precomputed encoder packs it as the converted model reads it (vision slots from the image, masked without)."""
    from models.convert.embeddings import dataset_captions_and_frames, main as embed_main, run

    path = tmp_path / "emb.safetensors"
    args = ["--encoders", "unused", "--out", str(path), "--prompt", 'a sign that says "open"', "--prompt", "",
            "--data", str(two_clips), "--dtype", "fp32"]
    import argparse

    p = argparse.ArgumentParser()
    from models.convert.embeddings import add_arguments

    add_arguments(p)
    run(p.parse_args(args), encoders=_FakeEncoders())
    assert callable(embed_main)
    enc = PrecomputedTextEncoder(str(path), max_length=3)
    _, frames = dataset_captions_and_frames(two_clips)
    assert '"' not in "" and "" in enc and enc.has_image(frames[0])
    tokens, mask = enc.encode(['a sign that says "open"', ""])
    assert tokens.shape == (2, V_TOK + G_TOK + 3, 24)
    assert not mask[:, :V_TOK].any()  # no images given: vision slots masked
    assert mask[0, V_TOK:V_TOK + G_TOK].sum() == 3 and not mask[1, V_TOK:V_TOK + G_TOK].any()
    assert mask[0, V_TOK + G_TOK:].sum() == 3  # LLM tokens truncated at max_length
    tokens2, mask2 = enc.encode(["", ""], images=[frames[0], None])
    assert mask2[0, :V_TOK].all() and not mask2[1, :V_TOK].any()
    torch.testing.assert_close(tokens2[0, :V_TOK, :12], torch.full((V_TOK, 12), float(frames[0].mean())))
    assert (tokens2[0, :V_TOK, 12:] == 0).all()
    with pytest.raises(KeyError, match="no vision tokens for this image"):
        enc.encode([""], images=[np.zeros((4, 4, 3), np.uint8)])
    # a model with the matching stream layout takes the packed tokens as they come
    cfg = replace(preset("tiny"), text_dim=24, vision_dim=12, vision_tokens=V_TOK, byt5_dim=20, byt5_tokens=G_TOK,
                  byt5_hidden=16, cond_type_embed=True, text_refiner_time=True, prediction="v")
    model = WorldDiT(cfg)
    out = model(torch.randn(2, 16, 2, 4, 4), torch.rand(2, 2), text=tokens2, text_mask=mask2)
    assert out.shape == (2, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="fewer than the 5 vision"):
        model(torch.randn(1, 16, 1, 4, 4), torch.rand(1, 1), text=torch.zeros(1, 4, 24))
    assert image_key(frames[0]) != image_key(frames[1])
    with pytest.raises(ValueError, match=r"byt5 tokens \[7, 20\]"):
        save_precomputed_streams(tmp_path / "bad.safetensors", {"x": (torch.zeros(1, 24), torch.zeros(7, 20))}, {},
                                 _FakeEncoders.layout)


def test_converted_ar_bundle_plays(wp_state, tmp_path):
    """A converted AR bundle (WorldPlay's sampling: CFG 6 with a negative prompt, context at sigma 0.014, full
    context attention) with a HunyuanVideo-1.5 VAE and a streams file runs through the inference player."""
    import yaml
    from diffusers import AutoencoderKLHunyuanVideo15

    from infer.player import WorldPlayer
    from models.convert.embeddings import precompute_streams

    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1,
                                scaling_factor=0.5).save_pretrained(str(tmp_path / "vae"))
    out = _convert(tmp_path, "ar_model", wp_state)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    precompute_streams(_FakeEncoders(), ["a town", ""], [image], out / "text_embeddings.safetensors")
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["sampling"].update(height=64, width=96, steps=2)  # a small video, few steps: the path, not the quality
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    player = WorldPlayer.from_bundle(out, device="cpu")
    assert player.rollout_cfg.guidance == 6.0 and player.rollout_cfg.context_sigma == 0.014
    player.reset(image, "a town")
    first, second = np.asarray(player.step("w")), np.asarray(player.step("w+right"))
    assert first.shape == (13, 64, 96, 3) and second.shape == (16, 64, 96, 3)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_parity_full_width():
    """Full HunyuanVideo-1.5 width (2048, 16 x 128 heads, 3584 / 1472 / 1152 streams) at depth 2, bf16 on the GPU:
    diffusers vs converted WorldDiT within bf16 tolerance, and the WorldPlay round trip bit-exact. The 54-block
    8.3B run is ``python -m benchmarks.hy15_parity``."""
    from benchmarks.hy15_parity import run_parity

    r = run_parity(depth=2, device="cuda", dtype=torch.bfloat16, frames=5, height=30, width=52)
    assert r["roundtrip_bit_exact"]
    # bf16 tolerance: WorldDiT's distance to the fp32 result is of the size of diffusers' own bf16 error
    assert r["rel_err_worlddit_vs_fp32"] <= 1.5 * r["rel_err_diffusers_vs_fp32"] + 1e-3, r
