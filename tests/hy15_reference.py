"""An independent reference for the released HunyuanVideo-1.5 / HY-WorldPlay transformer (tests only).

Two things, written from the published module names and the arithmetic of the official code (HY-WorldPlay
``hyvideo/models/transformers/worldplay_1_5_transformer.py``, ``prope/camera_rope.py``, ``modules/*``), not from
WorldDiT's implementation:

* :func:`official_shapes`: every parameter name and shape of the official layout (``img_in``, ``txt_in``,
  ``byt5_in``, ``vision_in``, ``cond_type_embedding``, ``double_blocks.*``, ``final_layer`` and WorldPlay's
  ``action_in`` / ``img_attn_prope_proj``), so a random checkpoint in that layout can be built;
* :func:`bidirectional_forward` (the full-sequence ``forward`` with ``forward_bi`` blocks: joint attention over
  [video ; text], text at the video's timestep) and :func:`ar_forward` (``forward_txt`` at timestep 0 with the
  padding dropped, a context pass that caches K/V with full attention, then a chunk attending to
  [text ; context ; chunk]), both operating directly on such a state dict.

Independence choices: attention is an explicit softmax (not SDPA), RoPE uses the rotate-half form on
repeat-interleaved tables, P^-1 comes from ``torch.linalg.inv`` (WorldDiT inverts analytically), the patch
embedding is a real Conv3d and the output is unpatchified with an einsum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Dims:
    """Shape of a reduced official transformer."""

    hidden: int = 32
    heads: int = 2
    depth: int = 2
    refiner_depth: int = 2
    mlp_ratio: int = 4
    channels: int = 4  # latent C; the patch embedding takes 2C + 1
    text_dim: int = 24  # LLM width
    byt5_dim: int = 20
    byt5_hidden: int = 40
    vision_dim: int = 12
    rope: tuple[int, int, int] = (4, 6, 6)
    theta: float = 256.0
    worldplay: bool = True  # action_in + img_attn_prope_proj


def official_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of ``HunyuanVideo_1_5_DiffusionTransformer`` (+ ``add_action_parameters``)."""
    D, M = d.hidden, d.hidden * d.mlp_ratio
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out: int, inp: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp), (out,)

    def ln(name: str, n: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (n,), (n,)

    s["img_in.proj.weight"], s["img_in.proj.bias"] = (D, 2 * d.channels + 1, 1, 1, 1), (D,)
    for emb in ("time_in", "txt_in.t_embedder") + (("action_in",) if d.worldplay else ()):
        lin(f"{emb}.mlp.0", D, 256)
        lin(f"{emb}.mlp.2", D, D)
    lin("txt_in.input_embedder", D, d.text_dim)
    lin("txt_in.c_embedder.linear_1", D, d.text_dim)
    lin("txt_in.c_embedder.linear_2", D, D)
    for j in range(d.refiner_depth):
        p = f"txt_in.individual_token_refiner.blocks.{j}"
        ln(f"{p}.norm1", D)
        lin(f"{p}.self_attn_qkv", 3 * D, D)
        lin(f"{p}.self_attn_proj", D, D)
        ln(f"{p}.norm2", D)
        lin(f"{p}.mlp.fc1", M, D)
        lin(f"{p}.mlp.fc2", D, M)
        lin(f"{p}.adaLN_modulation.1", 2 * D, D)
    ln("byt5_in.layernorm", d.byt5_dim)
    lin("byt5_in.fc1", d.byt5_hidden, d.byt5_dim)
    lin("byt5_in.fc2", d.byt5_hidden, d.byt5_hidden)
    lin("byt5_in.fc3", D, d.byt5_hidden)
    ln("vision_in.proj.0", d.vision_dim)
    lin("vision_in.proj.1", d.vision_dim, d.vision_dim)
    lin("vision_in.proj.3", D, d.vision_dim)
    ln("vision_in.proj.4", D)
    s["cond_type_embedding.weight"] = (3, D)
    for i in range(d.depth):
        p = f"double_blocks.{i}"
        for st in ("img", "txt"):
            lin(f"{p}.{st}_mod.linear", 6 * D, D)
            for x in "qkv":
                lin(f"{p}.{st}_attn_{x}", D, D)
            s[f"{p}.{st}_attn_q_norm.weight"] = s[f"{p}.{st}_attn_k_norm.weight"] = (D // d.heads,)
            lin(f"{p}.{st}_attn_proj", D, D)
            lin(f"{p}.{st}_mlp.fc1", M, D)
            lin(f"{p}.{st}_mlp.fc2", D, M)
        if d.worldplay:
            lin(f"{p}.img_attn_prope_proj", D, D)
    lin("final_layer.linear", d.channels, D)
    lin("final_layer.adaLN_modulation.1", 2 * D, D)
    return s


def random_state(d: Dims, seed: int = 0) -> dict[str, Tensor]:
    """A random checkpoint in the official layout (matrices ~ N(0, 1/fan_in), norm weights ~ 1, biases small)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in official_shapes(d).items():
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif "norm" in k and k.endswith("weight") or k.startswith("vision_in.proj.") and k.endswith("weight"):
            t = 1.0 + 0.1 * t
        else:
            t = 0.1 * t
        out[k] = t
    return out


# ----------------------------------------------------------------------------------------------- pieces


def _lin(sd: dict, name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_mlp(sd: dict, prefix: str, t: Tensor) -> Tensor:
    """TimestepEmbedder: [N] -> [N, D] (Linear, SiLU, Linear)."""
    return _lin(sd, f"{prefix}.mlp.2", F.silu(_lin(sd, f"{prefix}.mlp.0", timestep_features(t))))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q [B, Lq, H, Dh], k/v [B, Lk, H, Dh], mask [B, Lq, Lk] bool -> [B, Lq, H*Dh]; fully masked rows give 0."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2)


def rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)) * w


def rope_tables(positions_t: list[int], h: int, w: int, dims, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [T*h*w, head_dim], each axis' table repeat-interleaved (the official ``use_real`` layout)."""
    grid = torch.meshgrid(torch.tensor(positions_t, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                          torch.arange(w, dtype=torch.float32), indexing="ij")
    cos, sin = [], []
    for axis, dim in enumerate(dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        ang = torch.outer(grid[axis].reshape(-1), freqs)
        cos.append(ang.cos().repeat_interleave(2, dim=1))
        sin.append(ang.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, 1), torch.cat(sin, 1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, S, H, Dh] with tables [S, Dh]: x cos + rotate_half(x) sin, pairs (2i, 2i+1)."""
    re, im = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(3)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def prope_matrices(w2c: Tensor, Ks: Tensor) -> tuple[Tensor, Tensor]:
    """(P, P^-1) [B, T, 4, 4]: P = lift(diag(fx, fy, 1)) w2c (principal point dropped), inverse by linalg.inv."""
    lift = torch.zeros(*Ks.shape[:-2], 4, 4)
    lift[..., 0, 0], lift[..., 1, 1], lift[..., 2, 2], lift[..., 3, 3] = Ks[..., 0, 0], Ks[..., 1, 1], 1.0, 1.0
    P = lift @ w2c
    return P, torch.linalg.inv(P)


def tiled(x: Tensor, M: Tensor) -> Tensor:
    """x [B, T*N, H, Dh], M [B, T, 4, 4] -> each 4-channel group of each token multiplied by its frame's M."""
    B, S, H, Dh = x.shape
    T = M.shape[1]
    xg = x.reshape(B, T, S // T, H, Dh // 4, 4)
    return torch.einsum("btij,btnhgj->btnhgi", M, xg).reshape(B, S, H, Dh)


def per_frame(v: Tensor, T: int, tokens: int) -> Tensor:
    """[B*T, D] ordered (batch, frame) -> [B, T*tokens, D] (the official modulate/apply_gate broadcast)."""
    return v.reshape(-1, T, v.shape[-1]).repeat_interleave(tokens, dim=1)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def refiner(sd: dict, llm: Tensor, mask: Tensor, t_txt: Tensor, heads: int) -> Tensor:
    """SingleTokenRefiner: llm [B, L, text_dim], mask [B, L] bool, t_txt [B] -> [B, L, D]."""
    m = mask.float()[..., None]
    pooled = (llm * m).sum(1) / m.sum(1)
    c = timestep_mlp(sd, "txt_in.t_embedder", t_txt) + _lin(sd, "txt_in.c_embedder.linear_2",
                                                              F.silu(_lin(sd, "txt_in.c_embedder.linear_1", pooled)))
    x = _lin(sd, "txt_in.input_embedder", llm)
    amask = mask.clone()
    amask[:, 0] = True
    pair = amask[:, :, None] & amask[:, None, :]
    j = 0
    while f"txt_in.individual_token_refiner.blocks.{j}.norm1.weight" in sd:
        p = f"txt_in.individual_token_refiner.blocks.{j}"
        g_attn, g_mlp = _lin(sd, f"{p}.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
        h = F.layer_norm(x, (x.shape[-1],), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)
        q, k, v = _lin(sd, f"{p}.self_attn_qkv", h).unflatten(-1, (3, heads, -1)).unbind(2)
        x = x + _lin(sd, f"{p}.self_attn_proj", attend(q, k, v, pair)) * g_attn[:, None]
        h = F.layer_norm(x, (x.shape[-1],), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)
        x = x + _lin(sd, f"{p}.mlp.fc2", F.silu(_lin(sd, f"{p}.mlp.fc1", h))) * g_mlp[:, None]
        j += 1
    return x


def text_stream(sd: dict, llm: Tensor, llm_mask: Tensor, byt5: Tensor, byt5_mask: Tensor, vision: Tensor,
                t_txt: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """get_text_and_mask: the joint text tokens [B, Lv + Lb + L, D] in the official order (valid vision, valid ByT5,
    valid LLM, then the ByT5 and LLM padding zeroed) and their mask."""
    ct = sd["cond_type_embedding.weight"]
    txt = refiner(sd, llm, llm_mask, t_txt, heads) + ct[0]
    h = F.layer_norm(byt5, (byt5.shape[-1],), sd["byt5_in.layernorm.weight"], sd["byt5_in.layernorm.bias"])
    h = _lin(sd, "byt5_in.fc3", F.gelu(_lin(sd, "byt5_in.fc2", F.gelu(_lin(sd, "byt5_in.fc1", h)))))
    gly = h + ct[1]
    vis = F.layer_norm(vision, (vision.shape[-1],), sd["vision_in.proj.0.weight"], sd["vision_in.proj.0.bias"])
    vis = _lin(sd, "vision_in.proj.3", F.gelu(_lin(sd, "vision_in.proj.1", vis)))
    vis = F.layer_norm(vis, (vis.shape[-1],), sd["vision_in.proj.4.weight"], sd["vision_in.proj.4.bias"]) + ct[2]
    toks, masks = [], []
    for b in range(llm.shape[0]):
        bm, lm = byt5_mask[b], llm_mask[b]
        inner = torch.cat([gly[b][bm], txt[b][lm], torch.zeros_like(gly[b][~bm]), torch.zeros_like(txt[b][~lm])])
        inner_m = torch.cat([bm[bm], lm[lm], bm[~bm], lm[~lm]])
        toks.append(torch.cat([vis[b], inner]))
        masks.append(torch.cat([torch.ones(vis.shape[1], dtype=torch.bool), inner_m]))
    return torch.stack(toks), torch.stack(masks)


def _stream_qkv(sd: dict, p: str, st: str, x: Tensor, mods: list[Tensor], heads: int, T: int, tokens: int):
    shift, scale = per_frame(mods[0], T, tokens), per_frame(mods[1], T, tokens)
    h = layer_norm(x) * (1 + scale) + shift
    q, k, v = (_lin(sd, f"{p}.{st}_attn_{n}", h).unflatten(-1, (heads, -1)) for n in "qkv")
    return rms(q, sd[f"{p}.{st}_attn_q_norm.weight"]), rms(k, sd[f"{p}.{st}_attn_k_norm.weight"]), v


def _finish(sd: dict, p: str, st: str, x: Tensor, attn_out: Tensor, mods: list[Tensor], T: int, tokens: int) -> Tensor:
    x = x + attn_out * per_frame(mods[2], T, tokens)
    h = layer_norm(x) * (1 + per_frame(mods[4], T, tokens)) + per_frame(mods[3], T, tokens)
    h = _lin(sd, f"{p}.{st}_mlp.fc2", F.gelu(_lin(sd, f"{p}.{st}_mlp.fc1", h), approximate="tanh"))
    return x + h * per_frame(mods[5], T, tokens)


@dataclass
class Video:
    """The video side of one call: 65-channel input [B, 2C+1, T, H, W], per-frame t / action [B, T], cameras."""

    x_in: Tensor
    t: Tensor
    action: Tensor
    w2c: Tensor
    K: Tensor
    positions: list[int]


def _video_setup(sd: dict, d: Dims, v: Video):
    B, _, T, H, W = v.x_in.shape
    img = F.conv3d(v.x_in, sd["img_in.proj.weight"], sd["img_in.proj.bias"]).flatten(2).transpose(1, 2)
    vec = timestep_mlp(sd, "time_in", v.t.reshape(-1)) + timestep_mlp(sd, "action_in", v.action.reshape(-1).float())
    cos, sin = rope_tables(v.positions, H, W, d.rope, d.theta)
    P, P_inv = prope_matrices(v.w2c, v.K)
    return img, vec, cos, sin, P, P_inv, (B, T, H, W)


def _output(sd: dict, img: Tensor, vec: Tensor, shape) -> Tensor:
    B, T, H, W = shape
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=1)
    h = layer_norm(img) * (1 + per_frame(scale, T, H * W)) + per_frame(shift, T, H * W)
    out = _lin(sd, "final_layer.linear", h)
    return torch.einsum("bthwc->bcthw", out.reshape(B, T, H, W, -1))


def bidirectional_forward(sd: dict, d: Dims, v: Video, txt: Tensor, txt_mask: Tensor, t_txt: Tensor) -> Tensor:
    """``forward`` with ``forward_bi`` blocks (WorldPlay's bidirectional model); txt from :func:`text_stream`."""
    img, vec, cos, sin, P, P_inv, shape = _video_setup(sd, d, v)
    B, T, H, W = shape
    N, S, L = H * W, T * H * W, txt.shape[1]
    vec_txt = timestep_mlp(sd, "time_in", t_txt)
    full = torch.cat([torch.ones(B, S, dtype=torch.bool), txt_mask], 1)
    pair = full[:, :, None] & full[:, None, :]
    for i in range(d.depth):
        p = f"double_blocks.{i}"
        im = _lin(sd, f"{p}.img_mod.linear", F.silu(vec)).chunk(6, dim=-1)
        tm = _lin(sd, f"{p}.txt_mod.linear", F.silu(vec_txt)).chunk(6, dim=-1)
        iq, ik, iv = _stream_qkv(sd, p, "img", img, im, d.heads, T, N)
        tq, tk, tv = _stream_qkv(sd, p, "txt", txt, tm, d.heads, 1, L)
        pq, pk, pv = tiled(iq, P.transpose(-1, -2)), tiled(ik, P_inv), tiled(iv, P_inv)
        rq, rk = rotate(iq, cos, sin), rotate(ik, cos, sin)
        a = attend(torch.cat([rq, tq], 1), torch.cat([rk, tk], 1), torch.cat([iv, tv], 1), pair)
        ap = attend(torch.cat([pq, tq], 1), torch.cat([pk, tk], 1), torch.cat([pv, tv], 1), pair)[:, :S]
        ap = tiled(ap.unflatten(-1, (d.heads, -1)), P).flatten(2)
        new_img = _finish(sd, p, "img", img, _lin(sd, f"{p}.img_attn_proj", a[:, :S]) + _lin(sd, f"{p}.img_attn_prope_proj", ap),
                          im, T, N)
        txt = _finish(sd, p, "txt", txt, _lin(sd, f"{p}.txt_attn_proj", a[:, S:]), tm, 1, L)
        img = new_img
    return _output(sd, img, vec, shape)


def _text_cache(sd: dict, d: Dims, txt: Tensor) -> list[tuple[Tensor, Tensor]]:
    """forward_txt at timestep 0: per block the text keys/values (text attends to text only)."""
    vec_txt = timestep_mlp(sd, "time_in", torch.zeros(txt.shape[0]))
    cache, L = [], txt.shape[1]
    for i in range(d.depth):
        p = f"double_blocks.{i}"
        tm = _lin(sd, f"{p}.txt_mod.linear", F.silu(vec_txt)).chunk(6, dim=-1)
        tq, tk, tv = _stream_qkv(sd, p, "txt", txt, tm, d.heads, 1, L)
        cache.append((tk, tv))
        txt = _finish(sd, p, "txt", txt, _lin(sd, f"{p}.txt_attn_proj", attend(tq, tk, tv)), tm, 1, L)
    return cache


def _vision_pass(sd: dict, d: Dims, v: Video, text_kv, ctx_kv=None, store: bool = False):
    """forward_vision: keys [text ; cached context ; own] for both branches (text keys shared, untransformed)."""
    img, vec, cos, sin, P, P_inv, shape = _video_setup(sd, d, v)
    B, T, H, W = shape
    N, S = H * W, T * H * W
    stored = []
    for i in range(d.depth):
        p = f"double_blocks.{i}"
        im = _lin(sd, f"{p}.img_mod.linear", F.silu(vec)).chunk(6, dim=-1)
        iq, ik, iv = _stream_qkv(sd, p, "img", img, im, d.heads, T, N)
        pq, pk, pv = tiled(iq, P.transpose(-1, -2)), tiled(ik, P_inv), tiled(iv, P_inv)
        rq, rk = rotate(iq, cos, sin), rotate(ik, cos, sin)
        stored.append((rk, iv, pk, pv))
        tk, tv = text_kv[i]
        ck = [] if ctx_kv is None else [ctx_kv[i]]
        a = attend(rq, torch.cat([tk] + [c[0] for c in ck] + [rk], 1), torch.cat([tv] + [c[1] for c in ck] + [iv], 1))
        ap = attend(pq, torch.cat([tk] + [c[2] for c in ck] + [pk], 1), torch.cat([tv] + [c[3] for c in ck] + [pv], 1))
        ap = tiled(ap.unflatten(-1, (d.heads, -1)), P).flatten(2)
        img = _finish(sd, p, "img", img, _lin(sd, f"{p}.img_attn_proj", a) + _lin(sd, f"{p}.img_attn_prope_proj", ap),
                      im, T, N)
    return stored if store else _output(sd, img, vec, shape)


def ar_forward(sd: dict, d: Dims, context: Video, chunk: Video, txt: Tensor) -> Tensor:
    """WorldPlay's AR inference for one chunk: text cache (valid tokens only, batch 1), context K/V cache with full
    attention, then the chunk's output."""
    text_kv = _text_cache(sd, d, txt)
    ctx_kv = _vision_pass(sd, d, context, text_kv, store=True)
    return _vision_pass(sd, d, chunk, text_kv, ctx_kv)
