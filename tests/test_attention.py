"""Attention backends and chunk masks (models/attention.py) against a naive fp64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention import MaskSpec, attention, flash_available, resolve_backend

CPU_BACKENDS = ["masked", "sdpa", "cudnn", "flex"]
# flex_attention runs unfused (eager) on CPU and warns about it; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(q, k, v, spec: MaskSpec):
    """Explicit softmax(q k^T / sqrt(d)) v in fp64 with the rule written out token by token."""
    qids = [c for n, c in spec.q_segments for _ in range(n)]
    kids = [c for n, c in spec.k_segments for _ in range(n)]
    B = q.shape[0]
    allow = torch.zeros(B, len(qids), len(kids), dtype=torch.bool)
    for i, qc in enumerate(qids):
        for j, kc in enumerate(kids):
            if kc < 0:
                ok = True
            elif qc < 0:
                ok = False
            else:
                ok = (kc <= qc) if spec.causal else True
            allow[:, i, j] = ok
    if spec.k_valid is not None:
        allow &= spec.k_valid[:, None, :]
    if spec.q_valid is not None:
        allow |= ~spec.q_valid[:, :, None]
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allow[:, None], float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def rand_qkv(spec: MaskSpec, B=2, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, spec.sq, D, generator=g)
    k = torch.randn(B, H, spec.sk, D, generator=g)
    v = torch.randn(B, H, spec.sk, D, generator=g)
    return q, k, v


def layouts():
    """(name, spec) pairs covering every mode the model uses."""
    L, n = 5, 6  # text tokens, tokens per chunk
    pad = torch.ones(2, L + 3 * n, dtype=torch.bool)
    pad[1, 3:L] = False  # sample 1 has 3 valid text tokens
    return [
        ("bidirectional", MaskSpec(((3 * n, 0),), ((L, -1), (3 * n, 0)), False)),
        ("block_causal", MaskSpec(((n, 0), (n, 1), (n, 2)), ((L, -1), (n, 0), (n, 1), (n, 2)), True)),
        ("block_causal_padded_text", MaskSpec(((n, 0), (n, 1), (n, 2)), ((L, -1), (n, 0), (n, 1), (n, 2)), True, pad)),
        ("cached_chunk", MaskSpec(((n, 1),), ((L, -1), (2 * n, 0), (n, 1)), True)),
        ("no_text_causal_uneven", MaskSpec(((4, 0), (4, 1), (2, 2)), ((4, 0), (4, 1), (2, 2)), True)),
        ("joint_text_queries", MaskSpec(((L, -1), (n, 0), (n, 1)), ((L, -1), (n, 0), (n, 1)), False)),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,spec", layouts(), ids=[n for n, _ in layouts()])
def test_backends_match_reference(backend, name, spec):
    q, k, v = rand_qkv(spec)
    out = attention(q, k, v, spec, backend)
    torch.testing.assert_close(out, reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


def test_prefix_plan_of_block_causal_layout():
    n, L = 6, 5
    spec = MaskSpec(((n, 0), (n, 1), (n, 2)), ((L, -1), (n, 0), (n, 1), (n, 2)), True)
    assert spec.prefix_plan() == [(0, n, L + n), (n, 2 * n, L + 2 * n), (2 * n, 3 * n, L + 3 * n)]
    # bidirectional collapses to a single dense call
    assert MaskSpec(((3 * n, 0),), ((L, -1), (3 * n, 0)), False).prefix_plan() == [(0, 3 * n, L + 3 * n)]
    # keys out of chunk order: not a prefix layout (sdpa falls back to the dense mask, still exact)
    shuffled = MaskSpec(((n, 0), (n, 1)), ((n, 1), (n, 0)), True)
    assert shuffled.prefix_plan() is None
    q, k, v = rand_qkv(shuffled)
    torch.testing.assert_close(attention(q, k, v, shuffled, "sdpa"), reference(q, k, v, shuffled), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_causal_ignores_later_keys_and_text_ignores_video(backend):
    L, n = 4, 5
    spec = MaskSpec(((L, -1), (n, 0), (n, 1)), ((L, -1), (n, 0), (n, 1)), True)
    q, k, v = rand_qkv(spec)
    base = attention(q, k, v, spec, backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, L + n:] += 3.0
    v2[:, :, L + n:] -= 2.0  # change chunk 1's keys/values
    out = attention(q, k2, v2, spec, backend)
    assert torch.equal(out[:, :, : L + n], base[:, :, : L + n])  # text rows and chunk 0 rows: bit-identical
    assert not torch.allclose(out[:, :, L + n:], base[:, :, L + n:])
    k3, v3 = k.clone(), v.clone()
    k3[:, :, L:] += 1.0
    v3[:, :, L:] += 1.0  # change every video key: text queries must not notice
    assert torch.equal(attention(q, k3, v3, spec, backend)[:, :, :L], base[:, :, :L])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_padded_rows_stay_finite(backend):
    L = 4
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    spec = MaskSpec(((L, -1),), ((L, -1),), False, valid, valid)
    q, k, v = rand_qkv(spec)
    out = attention(q, k, v, spec, backend)
    assert torch.isfinite(out).all()
    # valid queries only see valid keys
    torch.testing.assert_close(out[0, :, :2], reference(q, k, v, spec)[0, :, :2], atol=1e-5, rtol=1e-5)
    ref_valid_only = torch.softmax(q[0, :, :2] @ k[0, :, :2].transpose(-1, -2) / math.sqrt(8), -1) @ v[0, :, :2]
    torch.testing.assert_close(out[0, :, :2], ref_valid_only, atol=1e-5, rtol=1e-5)


def test_backward_agrees_between_backends():
    spec = layouts()[2][1]  # block-causal with padded text
    q, k, v = rand_qkv(spec)
    grads = {}
    for backend in ("masked", "sdpa"):  # flex has no backward on CPU (torch 2.13); checked on GPU by the benchmark
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        (attention(qq, kk, vv, spec, backend) ** 2).sum().backward()
        grads[backend] = (qq.grad, kk.grad, vv.grad)
    for a, b in zip(grads["sdpa"], grads["masked"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_errors_and_auto_resolution():
    spec = MaskSpec.full(4, 6)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, spec, "cudnn_fast")
    with pytest.raises(ValueError, match="mask describes 4 x 6"):
        attention(q, k[:, :, :5], v[:, :, :5], spec, "sdpa")
    with pytest.raises(ValueError, match="k_valid"):
        MaskSpec.full(4, 6, k_valid=torch.ones(1, 5, dtype=torch.bool))
    assert resolve_backend("auto", torch.device("cpu"), spec) == "masked"
    assert resolve_backend("auto", torch.device("cuda"), spec) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), spec, needs_grad=True) == "cudnn"
    padded = MaskSpec.full(4, 6, k_valid=torch.ones(1, 6, dtype=torch.bool))
    assert resolve_backend("auto", torch.device("cuda"), padded) == "flex"
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash_attn"):
            attention(q, k, v, spec, "flash")


def test_block_mask_is_built_once_per_spec():
    spec = layouts()[1][1]
    q, k, v = rand_qkv(spec)
    attention(q, k, v, spec, "flex")
    bm = spec.block_mask(q.device)
    attention(q, k, v, spec, "flex")
    assert spec.block_mask(q.device) is bm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,spec", layouts(), ids=[n for n, _ in layouts()])
def test_gpu_backends_bf16_forward_backward(name, spec):
    """cuDNN/flash SDPA over key prefixes and compiled flex agree with the fp64 reference, grads included."""
    dev = torch.device("cuda")
    q, k, v = rand_qkv(spec, H=4, D=64)
    ref = reference(q, k, v, spec)
    spec_gpu = MaskSpec(spec.q_segments, spec.k_segments, spec.causal,
                        None if spec.k_valid is None else spec.k_valid.to(dev),
                        None if spec.q_valid is None else spec.q_valid.to(dev))
    grads = {}
    for backend in ("masked", "sdpa", "cudnn", "cudnn-token-major", "flex") + (
            ("flash",) if flash_available() and not spec.padded else ()):
        qq, kk, vv = (t.to(dev, torch.bfloat16).requires_grad_(True) for t in (q, k, v))
        if backend == "cudnn-token-major":  # the model's layout: [B, S, H, D] memory seen as [B, H, S, D]
            qq, kk, vv = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (qq, kk, vv))
        out = attention(qq, kk, vv, spec_gpu, backend.split("-")[0])
        torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)
        (out.float() ** 2).sum().backward()
        grads[backend] = [t.grad.float().cpu() for t in (qq, kk, vv)]
    for backend, gs in grads.items():
        for a, b in zip(gs, grads["masked"]):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
