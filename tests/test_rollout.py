"""The rollout sampler on the tiny WorldDiT (CPU, fp32): cache equivalence, streaming, CFG, schedules,
gradients, window mode, errors and determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data.actions import MotionSteps, keys_to_poses
from data.geometry import invert_rigid
from models.config import preset
from models.dit import WorldDiT
from models.flow import add_noise, cfg_combine, euler_step, inference_sigmas, output_to_velocity, output_to_x0
from models.memory import MemoryConfig, reframe_positions, select_context, select_window_context
from models.rollout import Rollout, RolloutConfig, gaussian_noise
from model_helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, C, H, W, LT = 2, 16, 4, 4, 3
# A small memory so that short rollouts already retrieve: 4 temporal latents + anchor + 1 spatial chunk.
MEM = MemoryConfig(temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, num_points=2000)




@pytest.fixture(scope="module")
def model() -> WorldDiT:
    torch.manual_seed(0)
    return randomize(WorldDiT(preset("tiny"))).eval()


class Spy(torch.nn.Module):
    """Wraps a WorldDiT and records every call: (kind, grad enabled, kwargs, output)."""

    def __init__(self, inner: WorldDiT):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[str, bool, dict, torch.Tensor | None]] = []

    def forward(self, x, sigma, **kw):
        out = self.inner(x, sigma, **kw)
        self.calls.append(("forward", torch.is_grad_enabled(), dict(kw, x=x, sigma=sigma), out))
        return out

    def new_cache(self):
        return self.inner.new_cache()

    def fill_text_cache(self, cache, text, text_mask=None):
        self.calls.append(("text", torch.is_grad_enabled(), dict(text=text), None))
        return self.inner.fill_text_cache(cache, text, text_mask)

    def fill_context_cache(self, cache, **kw):
        self.calls.append(("context", torch.is_grad_enabled(), kw, None))
        return self.inner.fill_context_cache(cache, **kw)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)


def trajectory(T: int, seed: int = 0, batch: int = B) -> dict:
    """Latent-rate conditioning of a random key-driven walk: actions, w2c, K (normalised), image, text."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(batch, T, 8, generator=g) < 0.3
    keys[:, 0] = False
    c2w = torch.stack([keys_to_poses(keys[b], MotionSteps(translation=0.5, rotation_deg=15.0)) for b in range(batch)])
    from data.actions import keys_to_action_id

    return dict(
        actions=keys_to_action_id(keys),
        w2c=invert_rigid(c2w.float()),
        K=torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.6, 0.5], [0.0, 0.0, 1.0]]).expand(batch, T, 3, 3).clone(),
        image_latent=torch.randn(batch, C, H, W, generator=g),
        text=torch.randn(batch, LT, 32, generator=g),
    )


def cfg_(**kw) -> RolloutConfig:
    base = dict(steps=3, shift=5.0, memory=MEM)
    base.update(kw)
    return RolloutConfig(**base)


def gen(rollout: Rollout, traj: dict, seed: int = 0, **kw):
    return rollout.generate(
        traj["image_latent"], traj["actions"], traj["w2c"], traj["K"], text=traj["text"],
        generator=torch.Generator().manual_seed(seed), **kw,
    )


# --------------------------------------------------------------------------- AR equivalences


@torch.no_grad()
def test_cached_rollout_equals_uncached_block_causal_reference(model):
    """Every chunk: the cached rollout == a full block-causal forward over [context ; chunk] without cache,
    where the context holds the previously generated clean latents tagged with the context sigma."""
    T, csig = 24, 0.05
    traj = trajectory(T, seed=1)
    cfg = cfg_(context_sigma=csig, context_causal=True)
    res = gen(Rollout(model, cfg), traj)
    assert res.latents.shape == (B, C, T, H, W)

    g = torch.Generator().manual_seed(0)
    sig = inference_sigmas(3, 5.0)
    c2w = invert_rigid(traj["w2c"])
    hist = torch.zeros(B, C, 0, H, W)
    retrieved = False
    for i in range(T // 4):
        s = slice(4 * i, 4 * i + 4)
        idx = select_context(c2w[:, : 4 * i], c2w[:, s], MEM)  # [B, M]
        M = idx.shape[1]
        retrieved |= M > 0 and not torch.equal(idx[0], torch.arange(M))
        assert torch.equal(res.chunks[i].context_idx, idx)
        ctx_pos, new_pos = reframe_positions(idx, 4)
        take = lambda t: torch.stack([t[b, idx[b]] for b in range(B)])  # noqa: E731
        x_ctx = torch.stack([hist[b][:, idx[b]] for b in range(B)])
        x = torch.randn(B, C, 4, H, W, generator=g)
        pinned = (torch.arange(4 * i, 4 * i + 4) == 0).expand(B, 4)  # chunk 0 holds the image latent
        pin = lambda t: torch.where(pinned[:, None, :, None, None], traj["image_latent"][:, :, None], t)  # noqa: E731
        x = pin(x)
        ctx_sig = torch.where(idx == 0, 0.0, csig)  # the image is clean wherever it sits
        for k in range(3):
            s_k = torch.where(pinned, 0.0, float(sig[k]))
            sigma = torch.cat([ctx_sig, s_k], dim=1)
            out = model(
                torch.cat([x_ctx, x], dim=2), sigma,
                actions=torch.cat([take(traj["actions"][:, : 4 * i]), traj["actions"][:, s]], 1),
                w2c=torch.cat([take(traj["w2c"][:, : 4 * i]), traj["w2c"][:, s]], 1),
                K=torch.cat([take(traj["K"][:, : 4 * i]), traj["K"][:, s]], 1),
                t_pos=torch.cat([ctx_pos, new_pos], 1), text=traj["text"],
                image_latent=traj["image_latent"],
                cond_mask=torch.cat([idx == 0, (torch.arange(4 * i, 4 * i + 4) == 0).expand(B, 4)], 1),
                chunk_size=4,
            )[:, :, M:]
            x0 = pin(output_to_x0(out, x, s_k, model.cfg.prediction))
            v = output_to_velocity(out, x, s_k, model.cfg.prediction)
            x = x0 if k == 2 else pin(euler_step(x, v, s_k, torch.where(pinned, 0.0, float(sig[k + 1]))))
        torch.testing.assert_close(res.chunks[i].latents, x, rtol=1e-4, atol=1e-4)
        if i == 0:
            assert torch.equal(res.chunks[0].latents[:, :, 0], traj["image_latent"])  # pinned exactly
        hist = torch.cat([hist, x], dim=2)
    assert retrieved  # some chunk used a non-contiguous (retrieved) memory
    assert res.chunks[-1].context_idx.shape[1] == 12

    # The comparison is sensitive: bidirectional context encoding changes the result.
    other = gen(Rollout(model, replace(cfg, context_causal=False)), traj)
    assert (other.latents[:, :, 8:] - res.latents[:, :, 8:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_context_reuse_is_exact_and_happens(model, guidance):
    """Keeping the K/V of leading context chunks that did not change gives what re-encoding gives."""
    traj = trajectory(32, seed=3)
    on = gen(Rollout(model, cfg_(context_sigma=0.014, guidance=guidance)), traj)
    off = gen(Rollout(model, cfg_(context_sigma=0.014, guidance=guidance, reuse_context=False)), traj)
    torch.testing.assert_close(on.latents, off.latents, atol=1e-5, rtol=1e-5)
    assert all(c.context_reused == 0 for c in off.chunks)
    reused = [c.context_reused for c in on.chunks]
    assert reused[0] == 0 and all(r % 4 == 0 for r in reused)
    assert any(0 < r < c.context_idx.shape[1] for r, c in zip(reused, on.chunks))  # partial reuse: the rest re-encoded


@torch.no_grad()
def test_streaming_equals_generate(model):
    traj = trajectory(20, seed=2)
    r = Rollout(model, cfg_(guidance=2.0, context_sigma=0.014))
    ref = gen(r, traj, seed=7)
    state = r.start(traj["image_latent"], traj["text"])
    gen_ = torch.Generator().manual_seed(7)
    outs = []
    for i in range(5):
        s = slice(4 * i, 4 * i + 4)
        outs.append(r.step(state, traj["actions"][:, s], traj["w2c"][:, s], traj["K"][:, s], gen_).latents)
    assert torch.equal(torch.cat(outs, dim=2), ref.latents)
    assert state.num_latents == 20 and torch.equal(state.latents, ref.latents)
    assert torch.equal(state.w2c, traj["w2c"]) and torch.equal(state.actions, traj["actions"])
    # A non-committed step leaves the history alone.
    extra = trajectory(24, seed=2)
    r.step(state, extra["actions"][:, 20:], extra["w2c"][:, 20:], extra["K"][:, 20:], gen_, commit=False)
    assert state.num_latents == 20 and len(state.chunks) == 5


@torch.no_grad()
def test_deterministic_given_the_generator(model):
    traj = trajectory(12, seed=3)
    r = Rollout(model, cfg_())
    a, b, c = gen(r, traj, seed=1), gen(r, traj, seed=1), gen(r, traj, seed=2)
    assert torch.equal(a.latents, b.latents)
    assert (a.latents - c.latents).abs().max() > 1e-3


@torch.no_grad()
def test_noise_hook_sees_every_draw_in_order(model):
    draws = []

    def hook(shape, *, generator, device, dtype, chunk, step):
        draws.append((chunk, step))
        return gaussian_noise(shape, generator=generator, device=device, dtype=dtype, chunk=chunk, step=step)

    traj = trajectory(8, seed=4)
    r = Rollout(model, cfg_(schedule="distilled"), noise_fn=hook)
    gen(r, traj)
    assert draws == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


# --------------------------------------------------------------------------- CFG and schedules


@torch.no_grad()
def test_guidance_combines_cond_and_uncond_branches(model):
    spy = Spy(model)
    traj = trajectory(8, seed=5)
    r = Rollout(spy, cfg_(guidance=3.0))
    res = gen(r, traj, return_trajectory=True)
    fwd = [c for c in spy.calls if c[0] == "forward"]
    assert len(fwd) == 2 * 3 * 2  # (cond, uncond) x 3 steps x 2 chunks
    assert spy.count("text") == 1  # only the conditional branch has text; filled once per prompt
    assert spy.count("context") == 2  # chunk 1, once per branch
    for k in range(3):
        cond, unc = fwd[2 * k], fwd[2 * k + 1]
        assert torch.equal(cond[2]["actions"], traj["actions"][:, :4])
        assert (unc[2]["actions"] == 0).all()
        assert torch.equal(unc[2]["w2c"], torch.eye(4).expand(B, 4, 4, 4))
        assert torch.equal(unc[2]["K"], cond[2]["K"])
        assert unc[2]["cache"].text_len == 0 and cond[2]["cache"].text_len == LT
        # raw outputs are combined, then read as a velocity (the pinned image latent has none)
        out = cfg_combine(cond[3], unc[3], 3.0)
        v = output_to_velocity(out, cond[2]["x"], cond[2]["sigma"], model.cfg.prediction)
        torch.testing.assert_close(res.chunks[0].trajectory.v[k][:, :, 1:], v[:, :, 1:])
        assert (res.chunks[0].trajectory.v[k][:, :, 0] == 0).all()
    # The unconditional context is encoded with null actions and cameras as well.
    ctx = [c for c in spy.calls if c[0] == "context"]
    assert (ctx[1][2]["actions"] == 0).all() and not (ctx[0][2]["actions"] == 0).all()


@torch.no_grad()
def test_guidance_switches_and_negative_prompt(model):
    spy = Spy(model)
    traj = trajectory(4, seed=6)
    neg = torch.randn(B, 2, 32)
    r = Rollout(spy, cfg_(guidance=2.0, uncond_actions=False, uncond_cameras=False))
    r.generate(traj["image_latent"], traj["actions"], traj["w2c"], traj["K"], text=traj["text"], neg_text=neg)
    fwd = [c for c in spy.calls if c[0] == "forward"]
    unc = fwd[1][2]
    assert torch.equal(unc["actions"], traj["actions"]) and torch.equal(unc["w2c"], traj["w2c"])
    assert unc["cache"].text_len == 2
    texts = [c[2]["text"] for c in spy.calls if c[0] == "text"]
    assert len(texts) == 2 and texts[1] is neg


@torch.no_grad()
def test_distilled_schedule_uses_four_calls_and_renoises(model):
    spy = Spy(model)
    traj = trajectory(12, seed=7)
    noises = []

    def hook(shape, *, generator, device, dtype, chunk, step):
        n = gaussian_noise(shape, generator=generator, device=device, dtype=dtype, chunk=chunk, step=step)
        noises.append(n)
        return n

    r = Rollout(spy, cfg_(schedule="distilled", steps=50), noise_fn=hook)
    res = gen(r, traj, return_trajectory=True)
    assert spy.count("forward") == 4 * 3 and spy.count("context") == 2
    sig = torch.tensor([1.0, 0.9375, 0.8333, 0.625, 0.0])
    for i, ch in enumerate(res.chunks):
        tr = ch.trajectory
        assert torch.allclose(tr.sigma, sig[:4])
        assert torch.equal(tr.x[0][:, :, 1:], noises[4 * i][:, :, 1:])
        pinned = (torch.arange(4 * i, 4 * i + 4) == 0).expand(B, 4)  # the image latent stays clean
        for k in range(3):  # x_{k+1} = (1 - s') x0_k + s' eps'
            s_next = torch.where(pinned, 0.0, sig[k + 1])
            torch.testing.assert_close(tr.x[k + 1], add_noise(tr.x0[k], noises[4 * i + k + 1], s_next))
        assert torch.equal(ch.latents, tr.x0[-1])
    # renoise=False walks the same sigmas with Euler steps.
    r2 = Rollout(model, cfg_(schedule="distilled", renoise=False))
    tr = gen(r2, traj, return_trajectory=True).chunks[0].trajectory
    torch.testing.assert_close(tr.x[1][:, :, 1:], euler_step(tr.x[0], tr.v[0], sig[0], sig[1])[:, :, 1:])


@torch.no_grad()
def test_exit_step_returns_that_steps_clean_prediction(model):
    spy = Spy(model)
    traj = trajectory(8, seed=8)
    res = gen(Rollout(spy, cfg_(steps=5)), traj, exit_step=2, return_trajectory=True)
    assert spy.count("forward") == 3 * 2
    for ch in res.chunks:
        assert ch.exit_step == 2 and ch.trajectory.x.shape[0] == 3
        assert torch.equal(ch.latents, ch.trajectory.x0[2])
    with pytest.raises(ValueError, match="exit_step must lie in"):
        gen(Rollout(model, cfg_(steps=5)), traj, exit_step=5)


# --------------------------------------------------------------------------- gradients


def test_grad_step_keeps_gradients_through_that_step_only(model):
    spy = Spy(model)
    traj = trajectory(8, seed=9)
    r = Rollout(spy, cfg_(schedule="distilled"))
    res = gen(r, traj, grad_step=[3, 1], return_trajectory=True)
    fwd = [c for c in spy.calls if c[0] == "forward"]
    assert [c[1] for c in fwd] == [False, False, False, True, False, True]  # chunk 1 exits at its grad step
    assert all(not c[1] for c in spy.calls if c[0] != "forward")  # caches never carry gradient
    a, b = res.chunks
    assert a.latents.requires_grad and b.latents.requires_grad
    assert not b.trajectory.x[1].requires_grad  # the input of the grad step comes from no-grad steps
    # Chunk 0's output entered chunk 1 only through the detached context: no gradient path back.
    assert torch.autograd.grad(b.latents.sum(), a.latents, retain_graph=True, allow_unused=True)[0] is None
    model.zero_grad()
    b.latents.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()

    # No grad step: nothing keeps a graph; keep_grad: every call does.
    assert not gen(Rollout(model, cfg_()), traj).latents.requires_grad
    spy.calls.clear()
    res = gen(Rollout(spy, cfg_(steps=2)), traj, keep_grad=True)
    assert all(c[1] for c in spy.calls if c[0] == "forward") and res.latents.requires_grad
    with pytest.raises(ValueError, match="comes after exit_step"):
        gen(Rollout(model, cfg_(steps=3)), traj, grad_step=2, exit_step=1)


def test_undetached_context_carries_gradient_into_earlier_chunks(model):
    traj = trajectory(8, seed=10)
    r = Rollout(model, cfg_(steps=2, detach_context=False))
    state = r.start(traj["image_latent"], traj["text"])
    g = torch.Generator().manual_seed(0)
    a = r.step(state, traj["actions"][:, :4], traj["w2c"][:, :4], traj["K"][:, :4], g, grad_step=1)
    a.latents.retain_grad()
    b = r.step(state, traj["actions"][:, 4:], traj["w2c"][:, 4:], traj["K"][:, 4:], g, grad_step=1)
    b.latents.sum().backward()
    assert a.latents.grad is not None and a.latents.grad.abs().sum() > 0
    model.zero_grad()


# --------------------------------------------------------------------------- window mode


@torch.no_grad()
def test_window_mode_shapes_context_and_positions():
    torch.manual_seed(1)
    model = randomize(WorldDiT(preset("tiny")), seed=1).eval()
    spy = Spy(model)
    cfg = cfg_(mode="window", window_latents=8, context_sigma=0.014)
    r = Rollout(spy, cfg)
    traj = trajectory(24, seed=11, batch=1)
    res = gen(r, traj)
    assert res.latents.shape == (1, C, 24, H, W) and len(res.chunks) == 3
    c2w = invert_rigid(traj["w2c"])[0]
    fwd = [c for c in spy.calls if c[0] == "forward"]
    assert spy.count("context") == 0 and spy.count("text") == 0 and len(fwd) == 3 * 3
    for i, ch in enumerate(res.chunks):
        expect = select_window_context(c2w[: 8 * i], c2w[8 * i : 8 * i + 8], MEM)
        assert torch.equal(ch.context_idx[0], expect)
        M = expect.numel()
        assert torch.equal(ch.context_pos[0], torch.arange(M))
        assert torch.equal(ch.positions[0], torch.arange(M, M + 8))
        call = fwd[3 * i][2]  # one bidirectional forward over [context ; window]
        assert call["x"].shape[2] == M + 8 and call["chunk_size"] is None and call["cache"] is None
        assert torch.equal(call["t_pos"][0], torch.arange(M + 8))
        assert torch.allclose(call["sigma"][0, :M], torch.where(expect == 0, 0.0, 0.014))  # the image slot is clean
        assert torch.equal(call["x"][:, :, :M], res.latents[:, :, expect])
        assert call["cond_mask"][0].tolist() == (expect == 0).tolist() + [i == 0] + [False] * 7
    assert res.chunks[0].context_idx.numel() == 0
    assert res.chunks[2].context_idx.shape[1] > 0 and not torch.equal(res.chunks[2].context_idx[0], torch.arange(16))


# --------------------------------------------------------------------------- errors


def test_bad_lengths_and_shapes_raise(model):
    traj = trajectory(10, seed=12)
    r = Rollout(model, cfg_())
    with pytest.raises(ValueError, match=r"k\*chunk_size = k\*4 latents .*got actions of shape \(2, 10\)"):
        gen(r, traj)
    traj = trajectory(12, seed=12)
    with pytest.raises(ValueError, match=r"k\*window_latents = k\*8"):
        gen(Rollout(model, cfg_(mode="window", window_latents=8)), traj)
    with pytest.raises(ValueError, match="w2c must be"):
        r.generate(traj["image_latent"], traj["actions"], traj["w2c"][:, :, :3], traj["K"])
    with pytest.raises(ValueError, match="int64"):
        r.generate(traj["image_latent"], traj["actions"].float(), traj["w2c"], traj["K"])
    with pytest.raises(ValueError, match="memory.chunk_size"):
        RolloutConfig(chunk_size=8)
    with pytest.raises(ValueError, match="window_latents"):
        RolloutConfig(mode="window", window_latents=6)
    state = r.start(traj["image_latent"])
    with pytest.raises(ValueError, match="generates 4 latents per call"):
        r.step(state, traj["actions"][:, :8], traj["w2c"][:, :8], traj["K"][:, :8])


@torch.no_grad()
def test_extend_teacher_forces_history_and_repeat_branches(model):
    """A real prefix pushed with extend() is what the next chunk's context is built from; repeated
    states sample independent candidates from one prefix (RL clip-level rollout)."""
    traj = trajectory(24, seed=13)
    r = Rollout(model, cfg_())
    state = r.start(traj["image_latent"], traj["text"])
    real = torch.randn(B, C, 20, H, W)
    r.extend(state, real, traj["actions"][:, :20], traj["w2c"][:, :20], traj["K"][:, :20])
    g = torch.Generator().manual_seed(0)
    rec = r.step(state, traj["actions"][:, 20:], traj["w2c"][:, 20:], traj["K"][:, 20:], g, commit=False)
    assert rec.start == 20 and rec.context_idx.shape == (B, 12)
    many = state.repeat_interleave(3)
    g = torch.Generator().manual_seed(0)
    cand = r.step(many, traj["actions"][:, 20:].repeat_interleave(3, 0), traj["w2c"][:, 20:].repeat_interleave(3, 0),
                  traj["K"][:, 20:].repeat_interleave(3, 0), g)
    assert cand.latents.shape == (3 * B, C, 4, H, W)
    assert (cand.latents[0] - cand.latents[1]).abs().max() > 1e-3  # different noise per candidate
    assert torch.equal(cand.context_idx, rec.context_idx.repeat_interleave(3, 0))


@torch.no_grad()
def test_bf16_autocast_rollout_stays_close_to_fp32(model):
    traj = trajectory(8, seed=14)
    r = Rollout(model, cfg_(guidance=2.0, context_sigma=0.014))
    ref = gen(r, traj)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gen(r, traj)
    assert low.latents.dtype == torch.float32 and torch.isfinite(low.latents).all()
    err = (low.latents - ref.latents).abs().mean() / ref.latents.abs().mean()
    assert err < 0.1
