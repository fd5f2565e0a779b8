"""Analytic FLOP counts of one WorldDiT call (and of the diffusers HunyuanVideo-1.5 peer): every matmul.

The denominator of every MFU / TFLOP/s figure in ``benchmarks/``. Checked against
``torch.utils.flop_counter.FlopCounterMode`` in tests/test_benchmark_flops.py.

Convention (model FLOPs, as in PaLM's MFU): a matmul of [m, k] by [k, n] costs 2·m·k·n; additions,
norms, softmax and other elementwise work are not counted. Backward costs one forward per gradient
that autograd actually computes: dX when the input requires grad, dW when the weight trains; so a
fully trained linear costs 3x its forward, a frozen one inside the graph 1x, and one with nothing
upstream 0x. Attention's backward is its four matmuls (dQ, dK, dP, dV), i.e. 2x its forward; the
extra score recomputation of fused kernels (they run at 2.5x) and activation-checkpoint recompute
(reported separately as ``recompute``, the difference between hardware and model FLOPs) are not model
FLOPs.

Per call, with B batch, T own latent frames, N = (H/ph)(W/pw) tokens per frame, L text tokens, D =
hidden = heads x head_dim, W = int(mlp_ratio·D), C the latent channels, depth blocks, cameras on::

    video stream, per block    2·B·T·N·(3D² [qkv] + D² [proj] + 2·D·W [MLP] + D² [prope_proj])
                               + 2·B·T·6D² [per-frame AdaLN]
    PRoPE transforms, per block 8·B·T·N·D x 4   (P^T q, P^-1 k, P^-1 v and P·out: a 4x4 per 4 channels)
    attention, per block       4·D·pairs x 2    (RoPE pass + PRoPE pass; each pass QK^T and AV)
        pairs = sum over own chunks j of  q_j · (L + M·N + N·min((j+1)·c, T))   block-causal, chunk c
              = B·T·N·(L + M·N + T·N)                                            bidirectional
        (M = cached context frames; queries of chunk j see the text, the context and chunks <= j)
    text stream, per block     2·B·L·3D² [qkv]  + 2·B·6D²  and, except in the last block,
                               2·B·L·(D² + 2·D·W) + 4·D·B·L²   (text attends to text only)
    text embedder              2·B·L·text_dim·D + 2·B·(text_dim·D + D²)
                               + per refiner block 2·B·L·(4D² + 2·D·W) + 4·D·B·L² + 2·B·2D²
    embedders, final layer     2·B·T·N·(2C+1)·D [patch] + 2·B·T·(256·D + D²) x 2 [time, action]
                               + 2·B·(256·D + D²) [text time vector] + 2·B·T·2D² + 2·B·T·N·D·C [final]

A context fill (``fill="context"``) runs the video stream over the context only (keys = cached text +
itself, block-causal over chunks or bidirectional) and stops its last block after the K/V (no
attention, projection, MLP or final layer); a text fill runs the text embedder and text stream only; a
cached denoising step (``context=M``) attends to the cached text and M context frames. LoRA adds
2·rows·r·(d_in + d_out) per adapted linear and trains only the adapters; gradients then start at the
first adapter, so the embedders and the frozen modulation layers have no backward at all.

The peer (:func:`peer_flops`) is diffusers' ``HunyuanVideo15Transformer3DModel``: the same double-stream
layout without PRoPE or per-frame modulation, with one joint bidirectional attention over
S = video + text tokens (4·D·B·S² per block, text queries included), a text refiner with its own
time/pooled embedders and a Conv3d patch embedding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from models.config import WorldDiTConfig
from models.embeddings import FREQ_DIM

__all__ = ["Flops", "worlddit_flops", "peer_flops", "attention_pairs", "H100_PEAK_BF16", "H100_MEASURED_BF16", "mfu"]

H100_PEAK_BF16 = 989e12  # dense bf16 tensor-core peak of an H100 SXM, FLOP/s
H100_MEASURED_BF16 = 800e12  # bf16 matmul rate measured on the GPU machine (shared/ENVIRONMENT.md)


@dataclass
class Flops:
    """FLOPs of one call: forward, backward (model FLOPs) and checkpoint recompute; ``parts`` splits the forward."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    backward_parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def model(self) -> float:
        """Forward + backward: the numerator of MFU."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """Model FLOPs plus activation-checkpoint recompute."""
        return self.model + self.recompute

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward": self.backward, "recompute": self.recompute, "model": self.model,
                "hardware": self.hardware, **{f"fwd_{k}": v for k, v in self.parts.items()}}


def mfu(flops: float, seconds: float, peak: float = H100_PEAK_BF16) -> float:
    """Model FLOP utilisation: flops / seconds / peak."""
    return flops / seconds / peak


def attention_pairs(batch: int, frames: int, tokens: int, text: int, context: int, chunk: int | None) -> int:
    """(query, key) pairs of the video queries: own frames attend to text + context + own (block-causal or all)."""
    if chunk is None:
        return batch * frames * tokens * (text + (context + frames) * tokens)
    pairs = 0
    for s in range(0, frames, chunk):
        q = min(chunk, frames - s)
        pairs += q * tokens * (text + (context + min(s + chunk, frames)) * tokens)
    return batch * pairs


class _Tally:
    """Accumulates forward/backward FLOPs while walking a model's calls in order, tracking requires_grad."""

    def __init__(self, mode: str, lora_rank: int | None, lora_targets: Sequence[str]):
        if mode not in ("forward", "train"):
            raise ValueError(f"flops: mode must be 'forward' or 'train', got {mode!r}")
        self.train = mode == "train"
        self.rank = lora_rank
        self.targets = tuple(lora_targets)
        self.out = Flops()
        self.recompute_on = False

    def _add(self, part: str, fwd: float, bwd: float) -> None:
        if self.recompute_on:
            self.out.recompute += fwd
        self.out.forward += fwd
        self.out.parts[part] += fwd
        if self.train:
            self.out.backward += bwd
            self.out.backward_parts[part] += bwd

    def _adapted(self, name: str) -> bool:
        return self.rank is not None and any(name == t or name.endswith("." + t) for t in self.targets)

    def linear(self, part: str, name: str, rows: int, d_in: int, d_out: int, x_grad: bool) -> bool:
        """A linear layer ``name`` over ``rows`` rows; returns whether its output requires grad."""
        if rows == 0:
            return x_grad
        f = 2 * rows * d_in * d_out
        if self.rank is None:  # every weight trains
            self._add(part, f, f * (int(x_grad) + 1))
            return True
        self._add(part, f, f * int(x_grad))  # frozen base weight
        if not self._adapted(name):
            return x_grad
        r = self.rank
        fa, fb = 2 * rows * d_in * r, 2 * rows * r * d_out
        self._add("lora", fa + fb, fa * (int(x_grad) + 1) + fb * 2)  # A: dW (+ dX); B: dW + dX
        return True

    def unused(self, part: str, rows: int, d_in: int, d_out: int) -> None:
        """A linear whose output never reaches the loss: forward only."""
        self._add(part, 2 * rows * d_in * d_out, 0)

    def attention(self, part: str, pairs: int, width: int, q_grad: bool, kv_grad: bool) -> bool:
        """softmax(QK^T)V over ``pairs`` (query, key) pairs summed over heads of total width ``width``."""
        a = 2 * pairs * width  # one of the matmuls (QK^T or AV)
        n_bwd = int(q_grad) + int(kv_grad) + int(q_grad or kv_grad) + int(kv_grad)  # dQ, dK, dP, dV
        self._add(part, 2 * a, a * n_bwd)
        return q_grad or kv_grad

    def transform(self, part: str, elements: int, x_grad: bool) -> bool:
        """PRoPE's per-group 4x4 matrix times every 4 channels: 8 FLOPs per element, dX only (elementwise
        multiply-adds in models/prope.py, counted like the matmul they are)."""
        f = 8 * elements
        self._add(part, f, f * int(x_grad))
        return x_grad


def worlddit_flops(
    cfg: WorldDiTConfig,
    *,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text: int = 0,
    chunk: int | None = None,
    context: int = 0,
    cached: bool = False,
    fill: str | None = None,
    mode: str = "forward",
    lora_rank: int | None = None,
    lora_targets: Sequence[str] = (),
    grad_ckpt: bool = False,
) -> Flops:
    """FLOPs of one WorldDiT call (see the module docstring for the formula).

    frames x height x width: the call's own latents (height, width in latent pixels); text: text
    tokens; chunk: block-causal chunk size over the own latents (None = bidirectional); cached: the
    text (and ``context`` cached context frames) come from a KV cache (a denoising step of the
    sampler; implied by ``context > 0`` and ``fill="context"``); fill: None, "context" (fill the
    context cache with the ``frames`` latents) or "text" (fill the text cache: text only).
    mode "train" adds the backward; with ``lora_rank`` only adapters on ``lora_targets`` train.
    ``grad_ckpt`` adds one forward of every block as recompute.
    """
    if fill not in (None, "context", "text"):
        raise ValueError(f"worlddit_flops: fill must be None, 'context' or 'text', got {fill!r}")
    if fill is not None and mode == "train":
        raise ValueError("worlddit_flops: cache fills run without gradients here; use mode='forward'")
    _, ph, pw = cfg.patch
    if height % ph or width % pw:
        raise ValueError(f"worlddit_flops: latent {height}x{width} is not divisible by the patch {ph}x{pw}")
    D, H = cfg.hidden, cfg.heads
    W = int(cfg.mlp_ratio * D)
    B, T, N, L = batch, frames, (height // ph) * (width // pw), text
    C = cfg.latent_channels
    if L and cfg.text_dim == 0:
        raise ValueError("worlddit_flops: text tokens given but the config has text_dim=0")
    cam = cfg.camera
    t = _Tally(mode, lora_rank, lora_targets)
    cached = (cached or context > 0 or fill == "context") and fill != "text"
    if fill == "text" and not L:
        raise ValueError("worlddit_flops: fill='text' needs text tokens")
    live_text = L > 0 and not cached  # the text goes through the embedder and text stream in this call
    last = cfg.depth - 1

    txt_rg = txt_vec_rg = False
    if live_text:
        pooled = t.linear("embed", "text_embed.pool.0", B, cfg.text_dim, D, False)
        c_rg = t.linear("embed", "text_embed.pool.2", B, D, D, pooled)
        txt_rg = t.linear("text_embed", "text_embed.in_proj", B * L, cfg.text_dim, D, False)
        for j in range(cfg.text_refiner_depth):
            p = f"text_embed.blocks.{j}"
            g_rg = t.linear("text_embed", f"{p}.gates.1", B, D, 2 * D, c_rg)
            qkv_rg = t.linear("text_embed", f"{p}.qkv", B * L, D, 3 * D, txt_rg)
            a_rg = t.attention("text_embed", B * L * L, D, qkv_rg, qkv_rg)
            o_rg = t.linear("text_embed", f"{p}.proj", B * L, D, D, a_rg)
            txt_rg = txt_rg or o_rg or g_rg
            h_rg = t.linear("text_embed", f"{p}.mlp.0", B * L, D, W, txt_rg)
            m_rg = t.linear("text_embed", f"{p}.mlp.2", B * L, W, D, h_rg)
            txt_rg = txt_rg or m_rg or g_rg
        e_rg = t.linear("embed", "time_embed.mlp.0", B, FREQ_DIM, D, False)
        txt_vec_rg = t.linear("embed", "time_embed.mlp.2", B, D, D, e_rg)

    vid_rg = vec_rg = False
    if fill != "text":
        vid_rg = t.linear("embed", "patch_embed.proj", B * T * N, (2 * C + 1 if cfg.i2v else C) * ph * pw, D, False)
        e_rg = t.linear("embed", "time_embed.mlp.0", B * T, FREQ_DIM, D, False)
        vec_rg = t.linear("embed", "time_embed.mlp.2", B * T, D, D, e_rg)
        if cfg.action:
            e_rg = t.linear("embed", "action_embed.mlp.0", B * T, FREQ_DIM, D, False)
            vec_rg = t.linear("embed", "action_embed.mlp.2", B * T, D, D, e_rg) or vec_rg

    video_pairs = attention_pairs(B, T, N, L, context, chunk)
    t.recompute_on = grad_ckpt and mode == "train"
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        tk_rg = False  # text keys/values of this block (cached ones never carry a gradient here)
        if live_text:
            tm_rg = t.linear("text_stream", f"{p}.txt.mod", B, D, 6 * D, txt_vec_rg)
            tk_rg = t.linear("text_stream", f"{p}.txt.qkv", B * L, D, 3 * D, txt_rg or tm_rg)
            if i < last:
                a_rg = t.attention("text_stream", B * L * L, D, tk_rg, tk_rg)
                o_rg = t.linear("text_stream", f"{p}.txt.proj", B * L, D, D, a_rg)
                txt_rg = txt_rg or o_rg or tm_rg
                h_rg = t.linear("text_stream", f"{p}.txt.mlp.0", B * L, D, W, txt_rg)
                m_rg = t.linear("text_stream", f"{p}.txt.mlp.2", B * L, W, D, h_rg)
                txt_rg = txt_rg or m_rg or tm_rg
        if fill == "text":
            continue
        rows = B * T * N
        m_rg = t.linear("video_stream", f"{p}.vid.mod", B * T, D, 6 * D, vec_rg)
        q_rg = t.linear("video_stream", f"{p}.vid.qkv", rows, D, 3 * D, vid_rg or m_rg)
        if cam:
            for _ in range(3):  # P^T q, P^-1 k, P^-1 v
                t.transform("prope", rows * D, q_rg)
        if fill == "context" and i == last:  # keys/values only
            continue
        passes = 2 if cam else 1
        a_rg = False
        for _ in range(passes):
            a_rg = t.attention("attention", video_pairs, D, q_rg, q_rg or tk_rg) or a_rg
        o_rg = t.linear("video_stream", f"{p}.vid.proj", rows, D, D, a_rg)
        if cam:
            t.transform("prope", rows * D, a_rg)  # P · out
            o_rg = t.linear("video_stream", f"{p}.prope_proj", rows, D, D, a_rg) or o_rg
        vid_rg = vid_rg or o_rg or m_rg
        h_rg = t.linear("video_stream", f"{p}.vid.mlp.0", rows, D, W, vid_rg or m_rg)
        f_rg = t.linear("video_stream", f"{p}.vid.mlp.2", rows, W, D, h_rg)
        vid_rg = vid_rg or f_rg or m_rg
    t.recompute_on = False
    if fill is None:
        m_rg = t.linear("final", "final.mod", B * T, D, 2 * D, vec_rg)
        t.linear("final", "final.linear", B * T * N, D, C * ph * pw, vid_rg or m_rg)
    return t.out


def peer_flops(
    *,
    hidden: int,
    depth: int,
    refiner_depth: int,
    in_channels: int,
    out_channels: int,
    text_dim: int,
    batch: int,
    video_tokens: int,
    text_tokens: int,
    mlp_ratio: float = 4.0,
    patch: int = 1,
    mode: str = "forward",
) -> Flops:
    """FLOPs of one ``HunyuanVideo15Transformer3DModel`` call with text tokens only (no ByT5 / image tokens).

    video_tokens = frames·(H/patch)·(W/patch); every weight trains in ``mode="train"``.
    """
    D, W = hidden, int(mlp_ratio * hidden)
    B, Nv, L = batch, video_tokens, text_tokens
    t = _Tally(mode, None, ())
    t.linear("embed", "x_embedder", B * Nv, in_channels * patch * patch, D, False)  # Conv3d, kernel = stride
    te = t.linear("embed", "time_embed.1", B, 256, D, False)
    t.linear("embed", "time_embed.2", B, D, D, te)
    # context_embedder: timestep + pooled-text embedders, input projection, refiner blocks
    for _ in range(2):
        h = t.linear("text_embed", "refiner_cond.1", B, 256 if _ == 0 else text_dim, D, False)
        t.linear("text_embed", "refiner_cond.2", B, D, D, h)
    t.linear("text_embed", "proj_in", B * L, text_dim, D, False)
    for _ in range(refiner_depth):
        for name in ("to_q", "to_k", "to_v"):
            t.linear("text_embed", name, B * L, D, D, True)
        t.attention("text_embed", B * L * L, D, True, True)
        t.linear("text_embed", "to_out", B * L, D, D, True)
        t.linear("text_embed", "norm_out", B, D, 2 * D, True)
        t.linear("text_embed", "ff.0", B * L, D, W, True)
        t.linear("text_embed", "ff.2", B * L, W, D, True)
    S = Nv + L
    for i in range(depth):
        for rows in (B * Nv, B * L):  # video stream, then text stream
            t.linear("blocks", "norm1", B, D, 6 * D, True)
            for name in ("q", "k", "v"):
                t.linear("blocks", name, rows, D, D, True)
            if i == depth - 1 and rows == B * L:  # the last block's text output is computed but never used
                t.unused("blocks", rows, D, D)
                t.unused("blocks", rows, D, W)
                t.unused("blocks", rows, W, D)
                continue
            t.linear("blocks", "out", rows, D, D, True)
            t.linear("blocks", "ff.0", rows, D, W, True)
            t.linear("blocks", "ff.2", rows, W, D, True)
        t.attention("attention", B * S * S, D, True, True)
    t.linear("final", "norm_out", B, D, 2 * D, True)
    t.linear("final", "proj_out", B * Nv, D, out_channels * patch * patch, True)
    return t.out
