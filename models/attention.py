"""Attention with chunk masks over several backends: one function, ``attention(q, k, v, spec, backend)``.

A :class:`MaskSpec` describes who may attend to whom with host-side *segments*: runs of tokens that
share a chunk id (``-1`` marks text). The rule, for query chunk ``qc`` and key chunk ``kc``:

* text keys (``kc < 0``) are visible to every query;
* video keys are invisible to text queries (text attends to text only);
* video keys are visible to video queries when the mask is bidirectional, or when ``kc <= qc`` for a
  block-causal mask (chunk i sees chunks j <= i and sees itself fully);
* optional key padding (``k_valid`` [B, Sk]) hides keys; a padded query row (``q_valid`` False)
  attends everywhere so that it stays finite (its output is never used).

Backends and where they run:

==========  =====================================================================================
``sdpa``    ``F.scaled_dot_product_attention`` without a mask: the block-causal mask is executed as
            one dense call per query chunk over its key *prefix* (keys are laid out in chunk order),
            so no work is wasted. On CUDA, calls without autograd (inference, cached steps) give the
            cuDNN kernel priority; calls that need gradients use flash / memory-efficient. Key
            padding becomes a boolean mask (which excludes the cuDNN/flash kernels). CPU and GPU.
``cudnn``   The same prefix calls with cuDNN forward *and* backward. With autograd on CUDA (half
            precision, no padding) it calls cuDNN's kernels directly (``_CudnnPrefixAttention``):
            dense q/k/v per prefix (free for the model's token-major one-sample tensors, a copy
            otherwise) and one key/value gradient buffer for all prefixes. cuDNN's backward faulted
            on the non-dense prefix views that head-major tensors give (``mha_graph.execute`` /
            illegal address, torch 2.11 + cuDNN 9.19). On CPU it is ``sdpa``.
``flex``    ``flex_attention`` with a ``BlockMask`` built once per spec (and reused by every layer
            and every step that shares the spec). Compiled on CUDA; on CPU it runs unfused (eager),
            forward only (torch has no flex backward on CPU): the tests use it as a cross-check.
``flash``   ``flash_attn.flash_attn_func`` over key prefixes, when the package is importable
            (bf16/fp16 only, no key padding). GPU.
``masked``  SDPA with a dense boolean mask [B, 1, Sq, Sk]. Reference-grade; CPU default.
``auto``    CUDA: ``cudnn`` with autograd, ``sdpa`` (cuDNN forward) without, ``flex`` when keys are
            padded. CPU: ``masked``. Measured on H100 with ``base``'s layouts (24 latents x 30x52
            tokens + 256 text, chunks of 4, RoPE and PRoPE heads in one call; benchmarks/RESULTS.md,
            ``python -m benchmarks.attention_kernels``): fwd+bwd cudnn 427 TFLOP/s, flex 324,
            flash 262; cached step cuDNN 643 vs flex 389; context pass 587 vs 391.
==========  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskSpec", "attention", "resolve_backend", "flash_available", "BACKENDS"]

BACKENDS = ("auto", "sdpa", "cudnn", "flex", "flash", "masked")

try:  # optional dependency: only on machines where it could be built
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def flash_available() -> bool:
    """Whether the ``flash_attn`` package imported."""
    return _flash_attn_func is not None


Segments = tuple[tuple[int, int], ...]  # ((length, chunk id), ...) in token order


def _segments(segs: Segments | list, what: str) -> Segments:
    out = tuple((int(n), int(c)) for n, c in segs)
    for n, c in out:
        if n < 0 or c < -1:
            raise ValueError(f"MaskSpec {what}: bad segment (length {n}, chunk {c}); need length >= 0, chunk >= -1")
    return tuple((n, c) for n, c in out if n > 0)


@dataclass(eq=False)
class MaskSpec:
    """Attention layout: query/key segments of (length, chunk id), causality and optional padding.

    Build it once per layout and share it across layers and steps: it memoises its device tensors,
    dense mask and flex ``BlockMask``.
    """

    q_segments: Segments
    k_segments: Segments
    causal: bool = False
    k_valid: Tensor | None = None  # [B, Sk] bool, False = padding key
    q_valid: Tensor | None = None  # [B, Sq] bool, False = padding query (attends everywhere)
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.q_segments = _segments(self.q_segments, "q_segments")
        self.k_segments = _segments(self.k_segments, "k_segments")
        for name, t, n in (("k_valid", self.k_valid, self.sk), ("q_valid", self.q_valid, self.sq)):
            if t is not None and (t.dim() != 2 or t.shape[1] != n or t.dtype != torch.bool):
                raise ValueError(f"MaskSpec.{name}: expected bool [B, {n}], got {t.dtype} {tuple(t.shape)}")

    @classmethod
    def full(cls, sq: int, sk: int, k_valid: Tensor | None = None, q_valid: Tensor | None = None) -> "MaskSpec":
        """Every query sees every (non-padded) key."""
        return cls(((sq, 0),), ((sk, 0),), False, k_valid, q_valid)

    @property
    def sq(self) -> int:
        return sum(n for n, _ in self.q_segments)

    @property
    def sk(self) -> int:
        return sum(n for n, _ in self.k_segments)

    @property
    def padded(self) -> bool:
        return self.k_valid is not None or self.q_valid is not None

    def visible(self, qc: int, kc: int) -> bool:
        """The chunk rule (without padding) for query chunk ``qc`` and key chunk ``kc``."""
        if kc < 0:
            return True
        if qc < 0:
            return False
        return kc <= qc or not self.causal

    # ---- plans and masks -------------------------------------------------------------------
    def prefix_plan(self) -> list[tuple[int, int, int]] | None:
        """Rows [q0, q1) see exactly keys [0, k1), as a list of (q0, q1, k1); None if not a prefix layout."""
        if "plan" in self._memo:
            return self._memo["plan"]
        plan: list[tuple[int, int, int]] | None = []
        q0 = 0
        for n, qc in self.q_segments:
            vis = [self.visible(qc, kc) for _, kc in self.k_segments]
            n_vis = sum(1 for v in vis if v)
            if not all(vis[:n_vis]):  # visible key segments must come first
                plan = None
                break
            k1 = sum(m for (m, _), v in zip(self.k_segments, vis) if v)
            if plan and plan[-1][2] == k1 and plan[-1][1] == q0:
                plan[-1] = (plan[-1][0], q0 + n, k1)
            else:
                plan.append((q0, q0 + n, k1))
            q0 += n
        self._memo["plan"] = plan
        return plan

    def chunk_ids(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-token chunk ids (int32) for queries [Sq] and keys [Sk], built on ``device`` without a host copy."""
        key = ("ids", str(device))
        if key not in self._memo:

            def build(segs: Segments) -> Tensor:
                parts = [torch.full((n,), c, dtype=torch.int32, device=device) for n, c in segs]
                return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=device)

            self._memo[key] = (build(self.q_segments), build(self.k_segments))
        return self._memo[key]

    def dense(self, device: torch.device) -> Tensor:
        """Boolean mask [B or 1, 1, Sq, Sk] (True = attend)."""
        key = ("dense", str(device))
        if key not in self._memo:
            qc, kc = self.chunk_ids(device)
            qc, kc = qc[:, None], kc[None, :]
            vis = (kc < 0) | ((qc >= 0) & ((kc <= qc) if self.causal else torch.ones_like(kc, dtype=torch.bool)))
            vis = vis[None]
            if self.k_valid is not None:
                vis = vis & self.k_valid.to(device)[:, None, :]
            if self.q_valid is not None:
                vis = vis | ~self.q_valid.to(device)[:, :, None]
            self._memo[key] = vis[:, None]
        return self._memo[key]

    def mask_mod(self, device: torch.device) -> Callable:
        """flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` implementing the rule above."""
        qids, kids = self.chunk_ids(device)
        causal = self.causal
        k_valid = None if self.k_valid is None else self.k_valid.to(device)
        q_valid = None if self.q_valid is None else self.q_valid.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            qc, kc = qids[q_idx], kids[kv_idx]
            vis = (kc < 0) | ((qc >= 0) & ((kc <= qc) if causal else (kc >= 0)))
            if k_valid is not None:
                vis = vis & k_valid[b, kv_idx]
            if q_valid is not None:
                vis = vis | ~q_valid[b, q_idx]
            return vis

        return mask_mod

    def block_mask(self, device: torch.device):
        """flex ``BlockMask`` for this layout (built once per device, then reused)."""
        key = ("block", str(device))
        if key not in self._memo:
            from torch.nn.attention.flex_attention import create_block_mask

            B = None
            if self.padded:
                B = (self.k_valid if self.k_valid is not None else self.q_valid).shape[0]
            self._memo[key] = create_block_mask(
                self.mask_mod(device), B, None, self.sq, self.sk, device=device
            )
        return self._memo[key]

    def padding_mask(self, q0: int, q1: int, k1: int, device: torch.device) -> Tensor | None:
        """Boolean padding mask [B, 1, 1 or q1-q0, k1] for a prefix call, or None without padding."""
        if not self.padded:
            return None
        m = None
        if self.k_valid is not None:
            m = self.k_valid.to(device)[:, None, None, :k1]
        if self.q_valid is not None:
            qpad = ~self.q_valid.to(device)[:, None, q0:q1, None]
            m = qpad if m is None else (m | qpad)
            m = m.expand(-1, -1, q1 - q0, k1)
        return m


# ---- backends ------------------------------------------------------------------------------
_compiled_flex: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager, unfused: fine for tests on CPU
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # default dynamic: a new length recompiles once, then generalises
    return _compiled_flex


def _sdpa_gpu_priority(needs_grad: bool, cudnn_backward: bool = False):
    """Kernel priority on CUDA: cuDNN first without autograd (or for the ``cudnn`` backend), else flash first.

    ``sdpa`` with autograd keeps flash / memory-efficient: cuDNN's backward faults on non-dense prefix
    views (``mha_graph.execute`` / illegal address, H100, torch 2.11 + cuDNN 9.19), which ``sdpa`` does
    not rule out; ``cudnn`` makes each prefix dense first.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if needs_grad and not cudnn_backward:
        order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    else:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def resolve_backend(backend: str, device: torch.device, spec: MaskSpec, needs_grad: bool = False) -> str:
    """The concrete backend that ``auto`` means for this device, mask and autograd need."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if spec.padded:
            return "flex"
        return "cudnn" if needs_grad else "sdpa"
    return "masked"


def _check(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected q/k/v [B, heads, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != spec.sq or k.shape[2] != spec.sk:
        raise ValueError(
            f"attention: q has {q.shape[2]} tokens and k has {k.shape[2]}, but the mask describes {spec.sq} x {spec.sk}"
        )


def attention(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, backend: str = "auto") -> Tensor:
    """Masked multi-head attention: q [B, H, Sq, D], k/v [B, H, Sk, D] -> [B, H, Sq, D] (softmax scale 1/sqrt(D))."""
    _check(q, k, v, spec)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, spec, needs_grad)
    if name == "masked":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense(q.device))
    if name == "flex":
        return _flex_fn(q.device)(q, k, v, block_mask=spec.block_mask(q.device))
    plan = spec.prefix_plan()
    if plan is None:  # not a prefix layout: fall back to the exact dense mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense(q.device))
    if name == "flash":
        return _flash_prefix(q, k, v, spec, plan)
    if name == "cudnn" and needs_grad and _cudnn_direct(q, spec):
        return _CudnnPrefixAttention.apply(q, k, v, plan)
    if name in ("sdpa", "cudnn"):
        return _sdpa_prefix(q, k, v, spec, plan, needs_grad, packed=name == "cudnn")
    raise AssertionError(name)


def _dense(t: Tensor) -> Tensor:
    """t [B, H, S, D] itself when its memory is dense (head-major or token-major), else a head-major copy.

    A key prefix k[:, :, :k1] of a token-major one-sample batch is dense; of a head-major tensor it is not
    (the head stride still spans all S tokens), and cuDNN's backward faulted on such strides here.
    """
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t
    return t.contiguous()


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient with the forward output's strides (what cuDNN expects)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd signature
        ctx.stride = x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        if grad.stride() == ctx.stride:
            return grad
        return torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (a copy only when they differ)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


class _CudnnPrefixAttention(torch.autograd.Function):
    """Block-causal attention on CUDA as one cuDNN call per key prefix, forward and backward.

    The backward runs cuDNN's backward per prefix and adds each call's key/value gradients into one
    buffer. Through autograd instead, each prefix's slice backward zero-fills and adds a full-length
    gradient: a tenth of a ``base`` training step (benchmarks/RESULTS.md). q/k/v [B, H, S, D] half
    precision, no padding; the output has q's memory layout.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: list) -> Tensor:  # noqa: ANN001
        out = torch.empty_like(q)
        lses, aux = [], []
        for q0, q1, k1 in plan:
            o, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                _dense(q[:, :, q0:q1]), _dense(k[:, :, :k1]), _dense(v[:, :, :k1]), None, True, 0.0, False, False)
            out[:, :, q0:q1].copy_(o)
            lses.append(lse)
            aux.append((cq, ck, mq, mk, seed, offset))
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.plan, ctx.aux = plan, aux
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001
        q, k, v, out, *lses = ctx.saved_tensors
        # key/value gradients sum over prefixes: accumulate in fp32, cast once
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        for (q0, q1, k1), lse, (cq, ck, mq, mk, seed, offset) in zip(ctx.plan, lses, ctx.aux):
            o = _dense(out[:, :, q0:q1])
            gq, gk, gv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                _like(grad[:, :, q0:q1], o), _dense(q[:, :, q0:q1]), _dense(k[:, :, :k1]), _dense(v[:, :, :k1]), o, lse,
                seed, offset, None, cq, ck, mq, mk, 0.0, False)
            dq[:, :, q0:q1].copy_(gq)
            dk[:, :, :k1].add_(gk)
            dv[:, :, :k1].add_(gv)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def _cudnn_direct(q: Tensor, spec: MaskSpec) -> bool:
    """Whether the cuDNN kernels can be called directly: CUDA, half precision, no padding, a supported head size."""
    D = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not spec.padded and D % 8 == 0 and D <= 128


def _sdpa_prefix(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, plan: list[tuple[int, int, int]],
                 needs_grad: bool, packed: bool = False) -> Tensor:
    def run() -> Tensor:
        outs = []
        for q0, q1, k1 in plan:
            mask = spec.padding_mask(q0, q1, k1, q.device)
            qs, ks, vs = q[:, :, q0:q1], k[:, :, :k1], v[:, :, :k1]
            if packed:
                qs, ks, vs = _dense(qs), _dense(ks), _dense(vs)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            outs.append(_DenseGrad.apply(o) if packed and needs_grad else o)
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)  # token-major, like q

    if q.device.type == "cuda":
        with _sdpa_gpu_priority(needs_grad, cudnn_backward=packed):
            return run()
    return run()


def _flash_prefix(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, plan: list[tuple[int, int, int]]) -> Tensor:
    if _flash_attn_func is None:
        raise RuntimeError("attention backend 'flash' requested but the flash_attn package is not importable")
    if spec.padded:
        raise ValueError("attention backend 'flash' does not support key/query padding; use 'flex' or 'sdpa'")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'flash' needs fp16/bf16 inputs, got {q.dtype} (use bf16 autocast)")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash_attn layout [B, S, H, D]
    outs = [_flash_attn_func(qt[:, q0:q1], kt[:, :k1], vt[:, :k1]) for q0, q1, k1 in plan]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.transpose(1, 2)
