"""WorldDiT behaviour on the tiny preset (CPU, fp32): causality, cache equivalence, invariances, sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data.geometry import invert_rigid, make_pose, rotation_x, rotation_y
from models.config import WorldDiTConfig, preset
from models.dit import WorldDiT
from models.layout import image_slots
from model_helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


B, C, H, W, L = 2, 16, 4, 4, 5
ZERO_INIT = ("action_embed.mlp.2.", "prope_proj.")




def make(skip=(), seed=0, **overrides) -> WorldDiT:
    torch.manual_seed(seed)
    return randomize(WorldDiT(replace(preset("tiny"), **overrides)), seed, skip).eval()


def random_w2c(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yaw, pitch = torch.randn(B, T, generator=g) * 20, torch.randn(B, T, generator=g) * 10
    R = (rotation_y(yaw) @ rotation_x(pitch)).float()
    c2w = make_pose(R, torch.randn(B, T, 3, generator=g))
    return invert_rigid(c2w)


def inputs(T: int = 6, seed: int = 0, text: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    Kn = torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.6, 0.5], [0.0, 0.0, 1.0]]).expand(B, T, 3, 3).clone()
    out = dict(
        x=torch.randn(B, C, T, H, W, generator=g),
        sigma=torch.rand(B, T, generator=g),
        actions=torch.randint(0, 81, (B, T), generator=g),
        w2c=random_w2c(T, seed + 1),
        K=Kn,
        image_latent=torch.randn(B, C, H, W, generator=g),
        cond_mask=image_slots(torch.arange(T)).expand(B, T),  # latent 0 holds the image
    )
    if text:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, 3:] = False  # sample 1: 3 valid tokens, 2 padding
        out.update(text=torch.randn(B, L, 32, generator=g), text_mask=mask)
    return out


def run(model, inp, **kw):
    x, sigma = inp["x"], inp["sigma"]
    rest = {k: v for k, v in inp.items() if k not in ("x", "sigma")}
    with torch.no_grad():
        return model(x, sigma, **rest, **kw)


def frames(inp: dict, sl: slice) -> dict:
    """The per-latent inputs of a frame range (image latent and text are shared)."""
    out = {}
    for k, v in inp.items():
        if k == "x":
            out[k] = v[:, :, sl]
        elif k in ("sigma", "actions", "w2c", "K", "t_pos", "cond_mask"):
            out[k] = v[:, sl]
        elif k == "image_latent":
            out[k] = v
    return out


# ---- causality and caching -------------------------------------------------------------------
def test_block_causal_earlier_chunks_ignore_later_chunks():
    model = make()
    inp = inputs(T=6)
    base = run(model, inp, chunk_size=2)
    changed = dict(inp)
    changed["x"] = inp["x"].clone()
    changed["x"][:, :, 4:] += torch.randn_like(inp["x"][:, :, 4:])
    changed["sigma"] = inp["sigma"].clone()
    changed["sigma"][:, 4:] = 0.9
    changed["actions"] = inp["actions"].clone()
    changed["actions"][:, 4:] = 7
    changed["w2c"] = inp["w2c"].clone()
    changed["w2c"][:, 4:] = random_w2c(2, seed=9)
    out = run(model, changed, chunk_size=2)
    assert torch.equal(out[:, :, :4], base[:, :, :4])  # exactly
    assert not torch.allclose(out[:, :, 4:], base[:, :, 4:])
    # without the causal mask the earlier chunks do see the change
    assert not torch.allclose(run(model, changed)[:, :, :4], run(model, inp)[:, :, :4])


@pytest.mark.parametrize("camera,text", [(True, True), (False, True), (True, False)])
def test_cache_equals_block_causal_forward(camera, text):
    model = make(camera=camera)
    inp = inputs(T=6, text=text)
    full = run(model, inp, chunk_size=2)
    cache = model.new_cache()
    with torch.no_grad():
        if text:
            model.fill_text_cache(cache, inp["text"], inp["text_mask"])
        for i in range(3):
            if i > 0:
                model.fill_context_cache(cache, **frames(inp, slice(0, 2 * i)), chunk_size=2, causal=True)
            else:
                cache.clear_context()
            chunk = frames(inp, slice(2 * i, 2 * i + 2))
            out = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
            torch.testing.assert_close(out, full[:, :, 2 * i: 2 * i + 2], atol=1e-5, rtol=1e-5)
    # the cache is read-only for denoising steps: a second step gives the same answer
    before = [t.clone() for t in (cache.layers[0].k, cache.layers[-1].v)]
    with torch.no_grad():
        chunk = frames(inp, slice(4, 6))
        again = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
    torch.testing.assert_close(again, full[:, :, 4:6], atol=1e-5, rtol=1e-5)
    assert torch.equal(before[0], cache.layers[0].k) and torch.equal(before[1], cache.layers[-1].v)


def test_cached_steps_write_into_the_context_buffer():
    """After one step the cache knows the chunk length: later context fills leave room for it, and steps
    write their own keys/values there instead of concatenating the prefix (same answers, no new buffer)."""
    model = make()
    inp = inputs(T=6)
    full = run(model, inp, chunk_size=2)
    cache = model.new_cache()
    with torch.no_grad():
        model.fill_text_cache(cache, inp["text"], inp["text_mask"])
        first = frames(inp, slice(0, 2))
        model(first.pop("x"), first.pop("sigma"), **first, chunk_size=2, cache=cache)
        n_tok = H * W
        assert cache.room == 2 * n_tok
        model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2, causal=True)
        buf = cache.layers[0].buf_k
        assert buf.shape[2] == cache.text_len + 6 * n_tok and cache.layers[0].length == cache.text_len + 4 * n_tok
        ptr = buf.data_ptr()
        for _ in range(2):
            chunk = frames(inp, slice(4, 6))
            out = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
            torch.testing.assert_close(out, full[:, :, 4:6], atol=1e-5, rtol=1e-5)
            assert cache.layers[0].buf_k.data_ptr() == ptr
    # with autograd the step concatenates (an in-place write would cut the graph) and leaves the buffer alone
    chunk = frames(inp, slice(4, 6))
    x = chunk.pop("x").requires_grad_(True)
    out = model(x, chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
    out.square().sum().backward()
    assert x.grad is not None and cache.layers[0].buf_k.data_ptr() == ptr


def test_joined_keys_are_token_major_so_prefixes_are_dense():
    """Keys joined with autograd (text prefix + own keys in training) land in token-major memory: every key
    prefix of a one-sample batch is then dense, which the cuDNN backend needs without a copy."""
    from models.kv_cache import LayerKV

    g = torch.Generator().manual_seed(0)
    text = LayerKV(*(torch.randn(1, 4, 3, 8, generator=g).requires_grad_() for _ in range(2)))
    own = LayerKV(*(torch.randn(1, 5, 4, 8, generator=g).transpose(1, 2).requires_grad_() for _ in range(2)))
    keys = text.extended(own)
    assert torch.equal(keys.k, torch.cat([text.k, own.k], dim=2)) and torch.equal(keys.v, torch.cat([text.v, own.v], dim=2))
    for n in (3, 6, 8):
        assert keys.k[:, :, :n].transpose(1, 2).is_contiguous()
    keys.k.sum().backward()
    assert text.k.grad is not None and own.k.grad is not None


def test_context_fill_reusing_leading_chunks_equals_a_full_fill():
    model = make()
    inp = inputs(T=8)
    other = inputs(T=8, seed=5)
    mixed = {k: v.clone() for k, v in inp.items()}  # chunk 0 (latents 0-1) shared, the rest different
    for k in ("x",):
        mixed[k][:, :, 2:] = other[k][:, :, 2:]
    for k in ("sigma", "actions", "w2c", "K"):
        mixed[k][:, 2:] = other[k][:, 2:]
    steps = {}
    for reuse in (0, 2):
        cache = model.new_cache()
        with torch.no_grad():
            model.fill_text_cache(cache, inp["text"], inp["text_mask"])
            model.fill_context_cache(cache, **frames(inp, slice(0, 6)), chunk_size=2)
            model.fill_context_cache(cache, **frames(mixed, slice(0, 6)), chunk_size=2, reuse=reuse)
            assert cache.context_frames == 6 and cache.context_t_pos.shape == (B, 6)
            chunk = frames(mixed, slice(6, 8))
            steps[reuse] = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
    torch.testing.assert_close(steps[2], steps[0], atol=1e-5, rtol=1e-5)
    full = run(model, mixed, chunk_size=2)
    torch.testing.assert_close(steps[2], full[:, :, 6:8], atol=1e-5, rtol=1e-5)
    # everything reused: the cache keeps what it has; a shorter context keeps its head
    cache = model.new_cache()
    with torch.no_grad():
        model.fill_context_cache(cache, **frames(inp, slice(0, 6)), chunk_size=2)
        model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2, reuse=4)
        assert cache.context_frames == 4 and cache.layers[0].length == 4 * H * W
        with pytest.raises(ValueError, match="reuse=3"):
            model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2, reuse=3)
        with pytest.raises(ValueError, match="reuse=2"):
            model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2, causal=False, reuse=2)


def test_text_cache_drops_an_all_true_mask():
    """A mask with no padding changes nothing but the attention path: the cache keeps no mask (dense kernels)."""
    model = make()
    inp = inputs(T=4)
    full_mask = torch.ones(inp["text"].shape[:2], dtype=torch.bool)
    outs = {}
    for name, mask in (("none", None), ("all-true", full_mask)):
        cache = model.new_cache()
        with torch.no_grad():
            model.fill_text_cache(cache, inp["text"], mask)
            assert cache.text_mask is None
            model.fill_context_cache(cache, **frames(inp, slice(0, 2)), chunk_size=2)
            chunk = frames(inp, slice(2, 4))
            outs[name] = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
    torch.testing.assert_close(outs["all-true"], outs["none"], atol=0, rtol=0)
    partial = full_mask.clone()
    partial[:, -1] = False
    cache = model.new_cache()
    with torch.no_grad():
        model.fill_text_cache(cache, inp["text"], partial)
    assert torch.equal(cache.text_mask, partial)


def test_bidirectional_context_cache_equals_two_chunk_forward():
    """fill_context_cache(causal=False): full attention inside the context, the chunk sees all of it."""
    model = make()
    inp = inputs(T=6)
    full = run(model, inp, chunk_size=3)  # chunk 0 = context (bidirectional inside), chunk 1 = current
    cache = model.new_cache()
    with torch.no_grad():
        model.fill_text_cache(cache, inp["text"], inp["text_mask"])
        model.fill_context_cache(cache, **frames(inp, slice(0, 3)), causal=False)
        chunk = frames(inp, slice(3, 6))
        out = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, cache=cache)
    torch.testing.assert_close(out, full[:, :, 3:], atol=1e-5, rtol=1e-5)


def test_reframed_context_positions_in_cache():
    """Memory frames can carry any positions: the cache path honours explicit t_pos like the full pass."""
    model = make()
    inp = inputs(T=4)
    inp["t_pos"] = torch.tensor([[0, 1, 5, 6], [2, 3, 4, 9]])
    inp["cond_mask"] = torch.tensor([[True, False, False, False]] * B)
    full = run(model, inp, chunk_size=2)
    cache = model.new_cache()
    with torch.no_grad():
        model.fill_text_cache(cache, inp["text"], inp["text_mask"])
        model.fill_context_cache(cache, **frames(inp, slice(0, 2)), chunk_size=2)
        chunk = frames(inp, slice(2, 4))
        out = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
    torch.testing.assert_close(out, full[:, :, 2:], atol=1e-5, rtol=1e-5)


# ---- invariances --------------------------------------------------------------------------------
def test_prope_is_invariant_to_the_world_frame():
    """Only relative cameras reach the video-video attention terms.

    Without text: text keys/values enter the PRoPE pass untransformed (WorldPlay's design), so
    q^T P_i k_text depends on the absolute camera; WorldPlay's data rebases the first camera to identity.
    """
    model = make()
    inp = inputs(T=4, text=False)
    assert all(blk.prope_proj.weight.abs().sum() > 0 for blk in model.blocks)  # not vacuous
    base = run(model, inp, chunk_size=2)
    G = make_pose((rotation_y(torch.tensor(33.0)) @ rotation_x(torch.tensor(-12.0))).float(), torch.tensor([0.7, -1.2, 2.0]))
    moved = dict(inp, w2c=inp["w2c"] @ invert_rigid(G))
    torch.testing.assert_close(run(model, moved, chunk_size=2), base, atol=1e-5, rtol=1e-5)
    # a change of *relative* camera does change the output
    rel = dict(inp, w2c=inp["w2c"].clone())
    rel["w2c"][:, 1] = random_w2c(1, seed=5)[:, 0]
    assert (run(model, rel, chunk_size=2) - base).abs().max() > 1e-3


def test_temporal_reframing_shift_invariance():
    """Video-video attention only sees position differences (text has no RoPE, so test without text)."""
    model = make()
    inp = inputs(T=4, text=False)
    inp["cond_mask"] = torch.tensor([[True, False, False, False]] * B)
    inp["t_pos"] = torch.tensor([[0, 1, 2, 3], [0, 2, 3, 7]])
    base = run(model, inp, chunk_size=2)
    shifted = run(model, dict(inp, t_pos=inp["t_pos"] + 11))
    torch.testing.assert_close(run(model, dict(inp, t_pos=inp["t_pos"] + 11), chunk_size=2), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted, base)  # (bidirectional differs from block-causal: the test has teeth)
    gap = dict(inp, t_pos=torch.tensor([[0, 1, 2, 9], [0, 2, 3, 7]]))  # a different relative layout changes it
    assert (run(model, gap, chunk_size=2) - base).abs().max() > 1e-4


def test_zero_init_branches_add_nothing_until_trained():
    full = make(skip=ZERO_INIT)  # action and PRoPE layers keep their zero init
    plain = WorldDiT(replace(preset("tiny"), action=False, camera=False)).eval()
    res = plain.load_state_dict(full.state_dict(), strict=False)
    assert not res.missing_keys
    assert res.unexpected_keys and all(k.startswith("action_embed.") or ".prope_proj." in k for k in res.unexpected_keys)
    inp = inputs(T=4)
    ref = run(plain, {k: v for k, v in inp.items() if k not in ("actions", "w2c", "K")}, chunk_size=2)
    torch.testing.assert_close(run(full, inp, chunk_size=2), ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        full.action_embed.mlp[2].weight.normal_(std=0.1)
    assert (run(full, inp, chunk_size=2) - ref).abs().max() > 1e-4
    with torch.no_grad():
        full.action_embed.mlp[2].weight.zero_()
        full.blocks[0].prope_proj.weight.normal_(std=0.1)
    assert (run(full, inp, chunk_size=2) - ref).abs().max() > 1e-4


def test_nulls_and_conditioning():
    model = make()
    inp = inputs(T=4)
    base = run(model, inp)
    # missing actions = action 0; missing cameras = identity projection (w2c = I, K = I) for every frame
    no_act = {k: v for k, v in inp.items() if k != "actions"}
    torch.testing.assert_close(run(model, no_act), run(model, dict(inp, actions=torch.zeros_like(inp["actions"]))))
    no_cam = {k: v for k, v in inp.items() if k not in ("w2c", "K")}
    eye = torch.eye(4).expand(B, 4, 4, 4)
    torch.testing.assert_close(run(model, no_cam), run(model, dict(inp, w2c=eye, K=torch.eye(3).expand(B, 4, 3, 3))),
                               atol=1e-6, rtol=1e-6)
    # empty text = no text; the image latent only enters where flagged (t_pos == 0 by default)
    no_text = {k: v for k, v in inp.items() if k not in ("text", "text_mask")}
    torch.testing.assert_close(run(model, no_text), run(model, dict(inp, text=torch.zeros(B, 0, 32), text_mask=None)))
    assert not torch.allclose(run(model, no_text), base)
    flagged = dict(inp, cond_mask=torch.tensor([[True, False, False, False]] * B))
    torch.testing.assert_close(run(model, flagged), base)
    # padded text tokens are invisible: changing them changes nothing
    t2 = inp["text"].clone()
    t2[1, 3:] += 5.0
    torch.testing.assert_close(run(model, dict(inp, text=t2)), base, atol=1e-6, rtol=1e-6)


def test_input_errors_name_the_argument():
    model = make()
    inp = inputs(T=4)
    with pytest.raises(ValueError, match="sigma must be"):
        model(inp["x"], inp["sigma"][:, :3])
    with pytest.raises(ValueError, match="w2c given without K"):
        model(inp["x"], inp["sigma"], w2c=inp["w2c"])
    with pytest.raises(ValueError, match="actions must be an integer"):
        model(inp["x"], inp["sigma"], actions=inp["sigma"])
    with pytest.raises(ValueError, match="text must be"):
        model(inp["x"], inp["sigma"], text=torch.randn(B, 3, 7))
    cache = model.new_cache()
    with pytest.raises(ValueError, match="do not pass text"):
        model(inp["x"], inp["sigma"], text=inp["text"], cache=cache)
    with pytest.raises(ValueError, match="WorldDiTConfig.rope_dims"):
        WorldDiT(WorldDiTConfig(rope_dims=[4, 4, 4]))
    with pytest.raises(ValueError, match="WorldDiTConfig.patch"):
        WorldDiT(WorldDiTConfig(patch=[2, 1, 1]))


# ---- backends and modes -------------------------------------------------------------------------
def test_backends_agree_in_the_model():
    inp = inputs(T=4)
    outs = {b: run(make(attn_backend=b), inp, chunk_size=2) for b in ("masked", "sdpa", "flex")}
    for b in ("sdpa", "flex"):
        torch.testing.assert_close(outs[b], outs["masked"], atol=1e-5, rtol=1e-5)
    model = make()
    torch.testing.assert_close(run(model, inp, chunk_size=4), run(model, inp), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, inp, chunk_size=9), run(model, inp), atol=1e-6, rtol=1e-6)


def test_spatial_patch_roundtrip_shape():
    model = make(patch=[1, 2, 2])
    inp = inputs(T=3)
    out = run(model, inp, chunk_size=1)
    assert out.shape == inp["x"].shape and torch.isfinite(out).all()


# ---- sizes, precision, checkpointing ------------------------------------------------------------
def test_parameter_counts():
    with torch.device("meta"):
        hy = WorldDiT(preset("hy15"))
    base, extra = hy.num_parameters("base"), hy.num_parameters("worldplay")
    assert abs(base - 8.30e9) < 0.05e9, base  # HunyuanVideo-1.5: 8.33B (we fold its ByT5/SigLIP mappers, 15M)
    assert sum(p.numel() for p in hy.action_embed.parameters()) == 256 * 2048 + 2048 + 2048 * 2048 + 2048  # ~4.7M
    assert extra == 256 * 2048 + 2048 + 2048 * 2048 + 2048 + 54 * (2048 * 2048 + 2048)  # ~0.231B
    assert abs(extra - 0.231e9) < 0.002e9
    ranges = {"tiny": (1e5, 5e6), "small": (1.2e8, 1.8e8), "base": (1.1e9, 1.5e9)}
    for name, (lo, hi) in ranges.items():
        with torch.device("meta"):
            n = WorldDiT(preset(name)).num_parameters()
        assert lo < n < hi, (name, n)
    assert hy.patch_embed.proj.in_features == 65


def test_bf16_autocast_forward_backward_and_checkpointing():
    inp = inputs(T=4)
    grads = {}
    for ckpt in (False, True):
        model = make(grad_checkpointing=ckpt).train()
        rest = {k: v for k, v in inp.items() if k not in ("x", "sigma")}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inp["x"], inp["sigma"], **rest, chunk_size=2)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        (out.float() ** 2).mean().backward()
        gs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in gs.values())
        assert gs["blocks.0.prope_proj.weight"].abs().sum() > 0 and gs["action_embed.mlp.2.weight"].abs().sum() > 0
        grads[ckpt] = gs
    assert grads[True].keys() == grads[False].keys()
    # pure bf16 weights without autocast: inputs are cast to the weights' dtype, output to x's
    with torch.no_grad():
        out = make().to(torch.bfloat16)(inp["x"], inp["sigma"], **{k: v for k, v in inp.items() if k not in ("x", "sigma")})
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_cache_and_bf16():
    dev = torch.device("cuda")
    inp = {k: v.to(dev) for k, v in inputs(T=6).items()}
    ref = None
    for backend in ("masked", "sdpa", "cudnn", "flex"):
        model = make(attn_backend=backend).to(dev)
        out = run(model, inp, chunk_size=2)
        ref = out if ref is None else ref
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        cache = model.new_cache()
        with torch.no_grad():
            model.fill_text_cache(cache, inp["text"], inp["text_mask"])
            model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2)
            chunk = frames(inp, slice(4, 6))
            step = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
        torch.testing.assert_close(step, ref[:, :, 4:], atol=1e-4, rtol=1e-4)
        model.train()
        rest = {k: v for k, v in inp.items() if k not in ("x", "sigma", "text_mask")}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(inp["x"], inp["sigma"], **rest, chunk_size=2)
        (y.float() ** 2).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_chains_match_eager():
    """torch.compile'd elementwise chains (fuse=True) compute what the eager ops do: outputs, cached steps, grads."""
    dev = torch.device("cuda")
    inp = {k: v.to(dev) for k, v in inputs(T=6).items()}
    rest = {k: v for k, v in inp.items() if k not in ("x", "sigma", "text_mask")}
    outs, steps, grads = {}, {}, {}
    for fuse in (False, True):
        model = make(fuse=fuse, attn_backend="cudnn").to(dev)
        outs[fuse] = run(model, inp, chunk_size=2)
        cache = model.new_cache()
        with torch.no_grad():
            model.fill_text_cache(cache, inp["text"], inp["text_mask"])
            for _ in range(2):  # the second fill reuses the room the first step left in the buffers
                model.fill_context_cache(cache, **frames(inp, slice(0, 4)), chunk_size=2)
                chunk = frames(inp, slice(4, 6))
                steps[fuse] = model(chunk.pop("x"), chunk.pop("sigma"), **chunk, chunk_size=2, cache=cache)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(inp["x"], inp["sigma"], **rest, chunk_size=2)
        (y.float() ** 2).mean().backward()
        grads[fuse] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs[True], outs[False], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[True], steps[False], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[True], outs[True][:, :, 4:], atol=1e-4, rtol=1e-4)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, atol=2e-2, rtol=5e-2)


def test_plucker_rays_are_unit_directions_with_orthogonal_moments_in_the_first_frames_world() -> None:
    from models.embeddings import plucker_rays

    K = torch.tensor([[0.8, 0.0, 0.5], [0.0, 0.8, 0.5], [0.0, 0.0, 1.0]]).expand(1, 2, 3, 3)
    c2w = torch.eye(4).repeat(1, 2, 1, 1)
    c2w[0, 1, :3, 3] = torch.tensor([1.0, 0.0, 0.0])  # the second camera one unit to the right
    rays = plucker_rays(invert_rigid(c2w), K, 2, 2).view(2, 4, 6)
    d, m = rays[..., :3], rays[..., 3:]
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose((d * m).sum(-1), torch.zeros(2, 4), atol=1e-6)
    assert torch.allclose(m[0], torch.zeros(4, 6)[:, :3]) and torch.allclose(d[0], d[1])  # same view, moved
    # top-left token of a 2x2 grid looks up-left: x and y negative, z forward
    assert bool((d[0, 0, :2] < 0).all()) and d[0, 0, 2] > 0


def test_ray_embedding_is_zero_at_init_and_then_reads_the_cameras() -> None:
    cfg = replace(preset("tiny"), text_dim=0)
    base = WorldDiT(cfg).eval()
    with_rays = WorldDiT(replace(cfg, rays=True)).eval()
    with_rays.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(1, cfg.latent_channels, 4, 4, 4)
    sigma = torch.full((1, 4), 0.5)
    w2c = torch.eye(4).repeat(1, 4, 1, 1)
    w2c[0, :, 0, 3] = torch.arange(4.0)
    K = torch.tensor([[0.8, 0.0, 0.5], [0.0, 0.8, 0.5], [0.0, 0.0, 1.0]]).expand(1, 4, 3, 3)
    kw = dict(actions=torch.zeros(1, 4, dtype=torch.long), w2c=w2c, K=K, chunk_size=4)
    randomize(base, 0, skip=())
    with_rays.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        torch.nn.init.zeros_(with_rays.ray_embed.proj.weight)
        assert torch.equal(base(x, sigma, **kw), with_rays(x, sigma, **kw))  # zero projection: the same function
        torch.nn.init.normal_(with_rays.ray_embed.proj.weight, std=0.5)
        moved = dict(kw, w2c=torch.eye(4).repeat(1, 4, 1, 1))
        assert not torch.allclose(with_rays(x, sigma, **kw), with_rays(x, sigma, **moved))
