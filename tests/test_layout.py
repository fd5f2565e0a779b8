"""The train/inference contract (models/layout.py): one layout for the mid-train stage and the sampler,
the pinned image slot, and sampling configs that reach beyond the trained positions."""

from __future__ import annotations

import pytest
import torch

from data.actions import MotionSteps, keys_to_action_id, keys_to_poses
from data.geometry import invert_rigid
from models.config import preset
from models.dit import WorldDiT
from models.layout import (
    check_trained_span,
    chunk_layout,
    clamp_memory,
    image_slots,
    position_span,
    sliding_window,
    window_layout,
)
from models.memory import MemoryConfig
from models.rollout import Rollout, RolloutConfig
from models.sampling import split_sampling
from model_helpers import randomize
from train.stages.inputs import clip_inputs, layout_inputs, model_kwargs

MEM = MemoryConfig(temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, num_points=2000)


def _clip(T: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(1, T, 8, generator=g) < 0.3
    keys[:, 0] = False
    c2w = keys_to_poses(keys[0], MotionSteps(translation=0.5, rotation_deg=20.0))[None]
    return {
        "x0": torch.randn(1, 16, T, 4, 4, generator=g),
        "actions": keys_to_action_id(keys),
        "w2c": invert_rigid(c2w.float()),
        "c2w": c2w,
        "K": torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.6, 0.5], [0.0, 0.0, 1.0]]).expand(1, T, 3, 3).clone(),
    }


@torch.no_grad()
def test_sampler_fed_the_true_history_reproduces_the_training_forward():
    """For a chunk far into a clip, the sampler's output given the true history (extend) equals the training
    forward over the mid-train layout of that chunk: same context, positions, σ tags and image slot."""
    torch.manual_seed(0)
    model = randomize(WorldDiT(preset("tiny")), seed=2).eval()
    T, cur, C = 28, 20, 4
    clip = _clip(T)
    lay = chunk_layout(clip["c2w"][:, :cur], clip["c2w"][:, cur : cur + C], MEM)
    assert lay.num_context == 12 and not torch.equal(lay.context_idx[0], torch.arange(8, 20))  # retrieval happened
    sigma = torch.full((1, lay.length), 0.7)
    inp = layout_inputs(clip_inputs(clip, clip["x0"], C), [lay], sigma, 0.0)
    x = torch.randn(1, 16, C, 4, 4, generator=torch.Generator().manual_seed(1))
    x_train = torch.cat([inp.x0[:, :, : lay.num_context], x], dim=2)  # clean context, noisy target
    train_out = model(x_train, inp.sigma, **model_kwargs(inp))[:, :, lay.num_context :]

    ro = Rollout(model, RolloutConfig(chunk_size=C, steps=2, memory=MEM))
    state = ro.start(clip["x0"][:, :, 0])
    ro.extend(state, clip["x0"][:, :, :cur], clip["actions"][:, :cur], clip["w2c"][:, :cur], clip["K"][:, :cur])
    ctx = ro.context(state, clip["actions"][:, cur : cur + C], clip["w2c"][:, cur : cur + C], clip["K"][:, cur : cur + C])
    assert torch.equal(ctx.layout.indices, lay.indices) and torch.equal(ctx.layout.positions, lay.positions)
    sample_out = ro.output(state, ctx, x, ro.chunk_sigma(ctx, 0.7, 1, C))
    torch.testing.assert_close(sample_out, train_out, rtol=1e-4, atol=1e-5)


def test_the_image_slot_is_latent_zero_wherever_it_sits():
    lay = chunk_layout(_clip(28)["c2w"][:, :20], _clip(28)["c2w"][:, 20:24], MEM)
    assert lay.image_mask[0].tolist() == (lay.indices[0] == 0).tolist() and lay.image_mask[0, 0]
    assert lay.loss_mask[0].tolist() == [0.0] * 12 + [1.0] * 4
    w = window_layout(2, 0, 8)
    assert w.loss_mask[:, 0].eq(0).all() and w.loss_mask[:, 1:].eq(1).all()  # the pinned image is never a target
    s = w.sigmas(torch.full((2, 8), 0.5), 0.0)
    assert s[:, 0].eq(0).all() and s[:, 1:].eq(0.5).all()
    assert image_slots(torch.tensor([3, 0, 5])).tolist() == [False, True, False]


def test_sampling_beyond_the_trained_positions_is_refused_or_clamped():
    mem = MemoryConfig()  # 12 temporal + anchor + 1 retrieved = 20 context latents
    assert position_span(mem, 4) == 24
    assert check_trained_span(mem, 4, "ar", 24, "b") is mem
    with pytest.raises(ValueError, match="reaches temporal position 23 .* covered positions 0..15"):
        check_trained_span(mem, 4, "ar", 16, "bundle x")
    with pytest.warns(UserWarning, match="clamped memory to max_context=12"):
        small = check_trained_span(mem, 4, "ar", 16, "bundle x", clamp=True)
    assert position_span(small, 4) <= 16 and small.temporal_latents == 12 and small.anchor is False
    assert clamp_memory(mem, 4, 20).anchor and clamp_memory(mem, 4, 20).temporal_latents == 12
    win = sliding_window(mem, 4, 16)
    assert (win.max_context, win.temporal_latents, win.spatial_chunks, win.anchor) == (12, 12, 0, False)
    # A bundle's sampling section records what training covered: loading a wider memory fails, naming it.
    section = {"chunk_size": 4, "memory": {"max_context": 20, "temporal_latents": 12}, "trained_positions": 16}
    with pytest.raises(ValueError, match="bundle y: sampling reaches temporal position 23"):
        split_sampling(section, "bundle y")
    rcfg, video = split_sampling({**section, "memory": {"max_context": 12, "temporal_latents": 4}}, "bundle y")
    assert video["trained_positions"] == 16 and rcfg.memory.max_context == 12
