"""Optimizers and schedules: Muon's orthogonalisation, grouping and update rule; AdamW parity; lr schedules; configs."""

import math

import pytest
import torch
from torch import nn

from train.config import DistConfig, OptimConfig, ScheduleConfig, TrainerConfig
from train.optim import (
    LRSchedule,
    Muon,
    build_optimizer,
    init_optimizer_state,
    lr_factor,
    muon_param_groups,
    muon_scale,
    newton_schulz,
    split_muon_params,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embed = nn.Embedding(10, 8)
        self.pos = nn.Embedding(4, 8)  # an embedding whose name does not say so: excluded by type
        self.proj_in = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Conv1d(16, 16, 3)) for _ in range(2))
        self.final_layer = nn.Linear(16, 3)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)


def test_newton_schulz_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (48, 48)]:
        g = torch.randn(*shape)
        o = newton_schulz(g, steps=5)
        s = torch.linalg.svdvals(o)
        # The quintic iteration lands singular values in a band around 1 rather than exactly on it.
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min().item(), s.max().item())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        cos = (o * polar).sum() / (o.norm() * polar.norm())
        assert cos > 0.97, (shape, cos.item())
    # Scale invariance: the iteration starts from the Frobenius-normalised matrix.
    g = torch.randn(16, 24)
    assert torch.allclose(newton_schulz(g), newton_schulz(1000 * g), atol=1e-5)


def test_newton_schulz_rejects_non_matrix():
    with pytest.raises(ValueError, match="expected a matrix"):
        newton_schulz(torch.randn(3, 4, 5))


def test_muon_grouping_is_explicit():
    net = Net()
    muon, adamw = split_muon_params(net, OptimConfig().muon_exclude)
    muon_names = {n for n, _ in muon}
    adamw_names = {n for n, _ in adamw}
    assert muon_names == {"proj_in.weight", "blocks.0.1.weight", "blocks.0.2.weight", "blocks.1.1.weight", "blocks.1.2.weight"}
    assert {"token_embed.weight", "pos.weight", "final_layer.weight", "final_layer.bias", "proj_in.bias", "blocks.0.0.weight", "blocks.0.0.bias"} <= adamw_names
    assert not any(n.startswith("frozen") for n in muon_names | adamw_names)  # frozen params are in no group
    assert all(p.ndim < 2 or "embed" in n or "final" in n or n == "pos.weight" for n, p in adamw)
    # The groups handed to the optimizer: Muon first, then AdamW with and without weight decay.
    groups = muon_param_groups(net, OptimConfig(name="muon", weight_decay=0.1))
    assert [g["use_muon"] for g in groups] == [True, False, False]
    assert groups[1]["weight_decay"] == 0.1 and groups[2]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups[2]["params"])


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="Muon needs >= 2-D"):
        Muon([{"params": [nn.Parameter(torch.zeros(4))], "use_muon": True}])


def test_muon_step_matches_the_update_rule():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 20))
    w0 = w.detach().clone()
    g = torch.randn(12, 20)
    lr, wd, mu = 0.02, 0.1, 0.95
    opt = Muon([{"params": [w], "use_muon": True, "lr": lr, "weight_decay": wd, "momentum": mu, "nesterov": True, "ns_steps": 5}])
    w.grad = g.clone()
    opt.step()
    # Fresh buffer: buf = g; Nesterov update = g + mu * buf = (1 + mu) g; NS is scale-invariant.
    expected = w0 * (1 - lr * wd) - lr * muon_scale(w.shape) * newton_schulz((1 + mu) * g)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert torch.equal(opt.state[w]["momentum_buffer"], g)
    assert muon_scale((12, 20)) == pytest.approx(0.2 * math.sqrt(20))
    assert muon_scale((8, 2, 3, 3)) == pytest.approx(0.2 * math.sqrt(18))  # conv: matrix view [out, in*k*k]


def test_muon_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(7))
    b = nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "use_muon": False, "lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}])
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, foreach=False)
    for _ in range(5):
        g = torch.randn(7)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_found_inf_skips_on_device(name):
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, OptimConfig(name=name, lr=1e-2, weight_decay=0.1))
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, float("nan"))
    opt.grad_scale, opt.found_inf = None, torch.ones(())
    opt.step()
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][kk], state[k][kk]) for k in state for kk in state[k])


@pytest.mark.parametrize("name,fused", [("muon", True), ("adamw", True), ("adamw", False)])
def test_init_optimizer_state_changes_nothing(name, fused):
    """Pre-created state (for complete checkpoints) must leave the optimizer's trajectory unchanged."""
    torch.manual_seed(0)
    net_a = Net()
    net_b = Net()
    net_b.load_state_dict(net_a.state_dict())
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, fused=fused)
    opt_a, opt_b = build_optimizer(net_a, cfg), build_optimizer(net_b, cfg)
    init_optimizer_state(opt_b)
    assert len(opt_b.state) == sum(1 for p in net_b.parameters() if p.requires_grad)
    assert all(torch.equal(pa, pb) for pa, pb in zip(net_a.parameters(), net_b.parameters()))
    for _ in range(3):
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            if pa.requires_grad:
                g = torch.randn_like(pa)
                pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(net_a.parameters(), net_b.parameters()))


def test_lr_schedules():
    warm = ScheduleConfig(warmup_steps=4, kind="constant")
    assert [lr_factor(s, warm, 10) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = ScheduleConfig(warmup_steps=0, kind="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos, 100) == pytest.approx(1.0)
    assert lr_factor(50, cos, 100) == pytest.approx(0.55)
    assert lr_factor(100, cos, 100) == pytest.approx(0.1)
    assert lr_factor(150, cos, 100) == pytest.approx(0.1)  # clamped past the end
    lin = ScheduleConfig(warmup_steps=10, kind="linear", min_lr_ratio=0.0, decay_steps=20)
    assert lr_factor(15, lin, 1000) == pytest.approx(0.5)  # decay_steps overrides the run length
    assert lr_factor(20, lin, 1000) == pytest.approx(0.0)
    net = Net()
    opt = build_optimizer(net, OptimConfig(name="muon", lr=0.5))
    sched = LRSchedule(opt, warm, 10)
    sched.apply(2)
    assert all(g["lr"] == pytest.approx(0.25) for g in opt.param_groups)
    opt.param_groups[0]["lr"] = 123.0  # e.g. a loaded optimizer state: the schedule still rules
    sched.apply(8)
    assert all(g["lr"] == pytest.approx(0.5) for g in opt.param_groups)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: OptimConfig(name="sgd"), "optim.name"),
        (lambda: OptimConfig(betas=[0.9]), "optim.betas"),
        (lambda: ScheduleConfig(kind="step"), "schedule.kind"),
        (lambda: DistConfig(backend="fsdp1"), "dist.backend"),
        (lambda: TrainerConfig(precision="fp16"), "trainer.precision"),
        (lambda: TrainerConfig(grad_accum=0), "trainer.grad_accum"),
    ],
)
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()
