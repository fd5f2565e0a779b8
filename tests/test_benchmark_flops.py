"""The analytic FLOP counts of benchmarks/flops.py against torch's FlopCounterMode, and the benchmark timer.

FlopCounterMode counts every matmul torch dispatches. Attention runs on the ``sdpa`` backend (one
dense SDPA call per block-causal key prefix, so no masked-out work) forced onto SDPA's math kernel,
which decomposes into the two bmm's per pass that the formula counts (CPU SDPA's fused kernel is
invisible to the counter) and whose autograd backward is the 2x-forward convention of the formula.
Tolerance: relative 1e-5. The only matmuls the formula leaves out are the 3x3 / 4x4 camera products
of the PRoPE projection matrices (18 FLOPs per latent frame, ~2e-6 of the total at these shapes).
The PRoPE group transforms run as elementwise multiply-adds (models/prope.py), which the counter does
not see: the comparisons leave the formula's ``prope`` part out, and a separate test checks it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import attention_pairs, peer_flops, worlddit_flops
from benchmarks.timing import EventTimer, time_calls
from models.config import preset
from models.dit import WorldDiT

REL = 1e-5
B, T, H, W, L = 2, 8, 4, 6, 8


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees while ``fn`` runs (attention forced onto SDPA's math kernel)."""
    fc = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), fc:
        fn()
    return fc.get_total_flops()


def inputs(cfg, T: int = T, text: int = L, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    C = cfg.latent_channels
    ang = torch.randn(B, T, generator=g)
    w2c = torch.eye(4).repeat(B, T, 1, 1)
    w2c[..., 0, 0], w2c[..., 0, 2], w2c[..., 2, 0], w2c[..., 2, 2] = ang.cos(), ang.sin(), -ang.sin(), ang.cos()
    w2c[..., :3, 3] = torch.randn(B, T, 3, generator=g)
    kw = dict(actions=torch.randint(0, cfg.num_actions, (B, T), generator=g), w2c=w2c,
              K=torch.tensor([[0.9, 0, 0], [0, 1.6, 0], [0, 0, 1.0]]).repeat(B, T, 1, 1),
              text=torch.randn(B, text, cfg.text_dim, generator=g) if text else None,
              image_latent=torch.randn(B, C, H, W, generator=g), cond_mask=(torch.arange(T) == 0).expand(B, T))
    return torch.randn(B, C, T, H, W, generator=g), torch.rand(B, T, generator=g), kw


def matmul_part(f) -> tuple[float, float]:
    """(forward, backward) of a formula without its elementwise PRoPE transforms."""
    return f.forward - f.parts.get("prope", 0.0), f.backward - f.backward_parts.get("prope", 0.0)


def fwd_bwd_counts(model, x, sigma, kw) -> tuple[int, int]:
    out = {}
    fwd = counted(lambda: out.setdefault("v", model(x, sigma, **kw)))
    bwd = counted(lambda: out["v"].square().mean().backward())
    return fwd, bwd


def test_attention_pairs_by_hand():
    # 2 chunks of 2 frames, 2 tokens each, 3 text tokens: chunk 0 sees 3 + 4 keys, chunk 1 sees 3 + 8.
    assert attention_pairs(1, 4, 2, 3, 0, 2) == 4 * 7 + 4 * 11
    assert attention_pairs(1, 4, 2, 3, 0, None) == 8 * (3 + 8)
    # a cached step: 2 frames after 5 context frames, one chunk
    assert attention_pairs(2, 2, 2, 3, 5, 2) == 2 * 4 * (3 + 10 + 4)


@pytest.mark.parametrize("camera, text, chunk", [(True, L, 4), (False, 0, None), (True, 0, 3)])
def test_training_flops_match_counter(camera, text, chunk):
    cfg = replace(preset("tiny"), attn_backend="sdpa", camera=camera)
    torch.manual_seed(0)
    model = WorldDiT(cfg)
    x, sigma, kw = inputs(cfg, text=text)
    fwd, bwd = fwd_bwd_counts(model, x, sigma, {**kw, "chunk_size": chunk})
    f = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=text, chunk=chunk, mode="train")
    assert (fwd, bwd) == pytest.approx(matmul_part(f), rel=REL)
    # the backward is between one (input grads only) and two (plus weight grads) forwards
    assert f.forward < f.backward < 2 * f.forward


@pytest.mark.parametrize("targets", [None, ["vid.mlp.0", "vid.mlp.2"]])
def test_lora_flops_match_counter(targets):
    from train.lora import LoraConfig, apply_lora

    cfg = replace(preset("tiny"), attn_backend="sdpa")
    lcfg = LoraConfig(rank=4) if targets is None else LoraConfig(rank=4, target_modules=targets)
    torch.manual_seed(0)
    model = apply_lora(WorldDiT(cfg), lcfg)
    x, sigma, kw = inputs(cfg)
    fwd, bwd = fwd_bwd_counts(model, x, sigma, {**kw, "chunk_size": 4})
    f = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=L, chunk=4, mode="train",
                       lora_rank=4, lora_targets=lcfg.target_modules)
    full = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=L, chunk=4, mode="train")
    assert (fwd, bwd) == pytest.approx(matmul_part(f), rel=REL)
    assert f.backward < full.backward  # frozen weights: no weight gradients


def test_cache_fills_and_cached_step_match_counter():
    cfg = replace(preset("tiny"), attn_backend="sdpa")
    torch.manual_seed(0)
    model = WorldDiT(cfg).eval()
    x, sigma, kw = inputs(cfg)
    Tc = 6
    cache = model.new_cache()
    ctx = dict(x=x[:, :, :Tc], sigma=sigma[:, :Tc], actions=kw["actions"][:, :Tc], w2c=kw["w2c"][:, :Tc],
               K=kw["K"][:, :Tc], image_latent=kw["image_latent"], cond_mask=kw["cond_mask"][:, :Tc])
    with torch.no_grad():
        text = counted(lambda: model.fill_text_cache(cache, kw["text"]))
        assert text == pytest.approx(worlddit_flops(cfg, batch=B, frames=0, height=H, width=W, text=L, fill="text").forward, rel=REL)
        for causal in (False, True):
            n = counted(lambda: model.fill_context_cache(cache, **ctx, chunk_size=2, causal=causal))
            f = worlddit_flops(cfg, batch=B, frames=Tc, height=H, width=W, text=L, chunk=2 if causal else None, fill="context")
            assert n == pytest.approx(matmul_part(f)[0], rel=REL)
        step = counted(lambda: model(x[:, :, Tc:], sigma[:, Tc:], actions=kw["actions"][:, Tc:], w2c=kw["w2c"][:, Tc:],
                                     K=kw["K"][:, Tc:], image_latent=kw["image_latent"], cond_mask=kw["cond_mask"][:, Tc:],
                                     cache=cache, chunk_size=2))
    f = worlddit_flops(cfg, batch=B, frames=T - Tc, height=H, width=W, text=L, chunk=2, context=Tc)
    assert step == pytest.approx(matmul_part(f)[0], rel=REL)


def test_prope_transform_flops_by_hand():
    # per block: P^T q, P^-1 k, P^-1 v and P·out, 8 FLOPs per element of B*T*N tokens x hidden channels;
    # the backward has dX of each (the input requires grad in training)
    cfg = preset("tiny")
    f = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=L, chunk=4, mode="train")
    per_block = 4 * 8 * B * T * H * W * cfg.hidden
    assert f.parts["prope"] == per_block * cfg.depth
    assert f.backward_parts["prope"] == per_block * cfg.depth


def test_checkpoint_recompute_is_hardware_not_model_flops():
    cfg = replace(preset("tiny"), attn_backend="sdpa", grad_checkpointing=True)
    torch.manual_seed(0)
    model = WorldDiT(cfg).train()
    x, sigma, kw = inputs(cfg)
    fwd, bwd = fwd_bwd_counts(model, x, sigma, {**kw, "chunk_size": 4})
    f = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=L, chunk=4, mode="train", grad_ckpt=True)
    plain = worlddit_flops(cfg, batch=B, frames=T, height=H, width=W, text=L, chunk=4, mode="train")
    assert f.model == plain.model and f.recompute > 0
    # torch may stop recomputing early once backward has what it needs: the recompute is an upper bound
    prope = f.parts["prope"] + f.backward_parts["prope"]
    assert (f.model - prope) * (1 - REL) < fwd + bwd <= (f.hardware - prope) * (1 + REL)


def test_peer_flops_match_counter():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    peer = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=4, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
        text_embed_dim=32, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    Tp = 3
    inp = dict(hidden_states=torch.randn(B, 33, Tp, H, W), timestep=torch.full((B,), 500.0),
               encoder_hidden_states=torch.randn(B, L, 32), encoder_attention_mask=torch.ones(B, L),
               encoder_hidden_states_2=torch.zeros(B, 0, 8), encoder_attention_mask_2=torch.zeros(B, 0),
               image_embeds=torch.zeros(B, 0, 8))
    out = {}
    fwd = counted(lambda: out.setdefault("v", peer(**inp, return_dict=False)[0]))
    bwd = counted(lambda: out["v"].square().mean().backward())
    f = peer_flops(hidden=64, depth=2, refiner_depth=1, in_channels=33, out_channels=16, text_dim=32, batch=B,
                   video_tokens=Tp * H * W, text_tokens=L, mode="train")
    assert fwd == pytest.approx(f.forward, rel=REL)
    assert bwd == pytest.approx(f.backward, rel=REL)


def test_event_timer_segments_add_up():
    def work(timer: EventTimer) -> None:
        time.sleep(0.002)
        timer.mark("a")
        time.sleep(0.001)
        timer.mark("b")
        time.sleep(0.001)
        timer.mark("a")  # a second "a" segment in the same repetition adds to the first
        time.sleep(0.001)

    totals, seg = time_calls(work, warmup=1, reps=3, device="cpu", rest_name="tail")
    assert len(totals) == 3 and set(seg) == {"a", "b", "tail"}
    for i in range(3):
        assert seg["a"][i] + seg["b"][i] + seg["tail"][i] == pytest.approx(totals[i], rel=1e-9)
        assert seg["a"][i] >= 0.003 and seg["b"][i] >= 0.001 and seg["tail"][i] >= 0.001
    with pytest.raises(RuntimeError, match="outside a repetition"):
        EventTimer("cpu").mark("x")


def test_out_of_memory_becomes_a_row_and_a_checkpointed_retry():
    from benchmarks.timing import with_oom_retry

    calls, ooms = [], []

    def run(ckpt: bool) -> dict:
        calls.append(ckpt)
        if not ckpt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return {"step_s": 1.0}

    def on_oom(ckpt: bool, message: str) -> None:
        ooms.append((ckpt, message))

    row = with_oom_retry(run, ckpt=False, retry=True, device="cpu", on_oom=on_oom)
    assert calls == [False, True] and row == {"step_s": 1.0, "note": "checkpointed after OOM"}
    assert ooms == [(False, "CUDA out of memory. Tried to allocate 9.00 GiB")]
    calls.clear()
    assert with_oom_retry(run, ckpt=False, retry=False, device="cpu", on_oom=on_oom) is None and calls == [False]
