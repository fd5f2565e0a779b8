"""Flow matching: noise/target algebra, schedules, training-σ statistics, and an exact-velocity ODE."""

from __future__ import annotations

import pytest
import torch

from models.flow import (
    DISTILLED_SIGMAS,
    add_noise,
    cfg_combine,
    chunk_sigmas,
    distilled_sigmas,
    eps_from_velocity,
    euler_step,
    inference_sigmas,
    sample_train_sigma,
    sampling_sigmas,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)


def _latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        2, 3, 5, 4, 4, generator=g, dtype=torch.float64
    )


def test_true_velocity_recovers_x0_and_eps_per_latent_sigma() -> None:
    x0, eps = _latents()
    sigma = torch.rand(2, 5, dtype=torch.float64)
    x = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x, v, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_from_velocity(x, v, sigma), eps, rtol=0, atol=1e-12)
    # σ[b, t] applies to latent frame t of sample b only.
    b, t = 1, 3
    expected = (1 - sigma[b, t]) * x0[b, :, t] + sigma[b, t] * eps[b, :, t]
    torch.testing.assert_close(x[b, :, t], expected)
    # Endpoints and per-sample / scalar σ.
    assert torch.equal(add_noise(x0, eps, 0.0), x0) and torch.equal(add_noise(x0, eps, 1.0), eps)
    per_sample = add_noise(x0, eps, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(per_sample[0], x0[0]) and torch.equal(per_sample[1], eps[1])


def test_euler_step_with_true_velocity_lands_on_x0() -> None:
    """Along a straight path one Euler step from σ to 0 with the exact velocity is exact."""
    x0, eps = _latents(1)
    sigma = torch.rand(2, 5, dtype=torch.float64)
    x = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(euler_step(x, v, sigma, torch.zeros_like(sigma)), x0)
    torch.testing.assert_close(euler_step(x, v, sigma, sigma * 0.5), add_noise(x0, eps, sigma * 0.5))


def test_sigma_shape_errors_are_named() -> None:
    x0, eps = _latents()
    with pytest.raises(ValueError, match=r"sigma of shape \[2, 4\] .* B=2, T=5"):
        add_noise(x0, eps, torch.rand(2, 4))
    with pytest.raises(ValueError, match="shift must be positive"):
        shift_sigma(0.5, 0.0)


def test_shift_fixes_endpoints_and_is_monotone() -> None:
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0, 5.0):
        out = shift_sigma(s, shift)
        assert out[0] == 0 and out[-1] == 1
        assert (out.diff() > 0).all()
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    assert (shift_sigma(s[1:-1], 5.0) > s[1:-1]).all()  # shift > 1 pushes toward noise


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 5.0), (50, 5.0), (50, 7.0)])
def test_inference_sigmas_endpoints_and_monotonicity(steps: int, shift: float) -> None:
    sig = inference_sigmas(steps, shift)
    assert sig.shape == (steps + 1,)
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert (sig.diff() < 0).all()
    torch.testing.assert_close(sig[1], torch.tensor(shift_sigma(1 - 1 / steps, shift), dtype=torch.float32))


def test_distilled_schedule_is_self_forcing_shifted() -> None:
    sig = distilled_sigmas()
    assert sig.tolist()[-1] == 0.0 and len(sig) == 5 and (sig.diff() < 0).all()
    self_forcing = torch.tensor([1000.0, 750.0, 500.0, 250.0]) / 1000
    torch.testing.assert_close(shift_sigma(self_forcing, 5.0), torch.tensor(DISTILLED_SIGMAS), atol=1e-3, rtol=0)
    torch.testing.assert_close(sampling_sigmas("distilled", 50, 5.0), sig)
    torch.testing.assert_close(sampling_sigmas("euler", 8, 3.0), inference_sigmas(8, 3.0))
    with pytest.raises(ValueError, match="unknown schedule 'ddim'"):
        sampling_sigmas("ddim", 50, 5.0)


def test_logit_normal_training_sigma_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    sig = sample_train_sigma(200_000, g, shift=3.0)
    assert sig.min() > 0 and sig.max() < 1
    assert abs(sig.median().item() - shift_sigma(0.5, 3.0)) < 0.005  # = 0.75
    unshifted = sample_train_sigma((400, 500), g, logit_mean=0.5, logit_std=2.0, shift=1.0)
    logits = torch.logit(unshifted.double())
    assert abs(logits.mean().item() - 0.5) < 0.02 and abs(logits.std().item() - 2.0) < 0.02
    # The shift is a monotone map, so quantiles map through it.
    q = torch.tensor([0.1, 0.9])
    base = sample_train_sigma(200_000, torch.Generator().manual_seed(1), shift=1.0)
    shifted = sample_train_sigma(200_000, torch.Generator().manual_seed(1), shift=3.0)
    torch.testing.assert_close(shifted.quantile(q), shift_sigma(base.quantile(q), 3.0))


def test_chunk_sigmas_share_one_sigma_per_chunk() -> None:
    g = torch.Generator().manual_seed(0)
    sig = chunk_sigmas(3, 10, 4, g)
    assert sig.shape == (3, 10)
    for a, b in ((0, 4), (4, 8), (8, 10)):  # last chunk is partial
        assert (sig[:, a:b] == sig[:, a : a + 1]).all()
    assert (sig[:, 0] != sig[:, 4]).all() and (sig[:, 4] != sig[:, 8]).all()
    again = chunk_sigmas(3, 10, 4, torch.Generator().manual_seed(0))
    assert torch.equal(sig, again)
    many = chunk_sigmas(1000, 8, 4, torch.Generator().manual_seed(2), shift=3.0)
    assert abs(many[:, ::4].median().item() - 0.75) < 0.02
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_sigmas(1, 8, 0)


def test_cfg_combine() -> None:
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), u)
    torch.testing.assert_close(cfg_combine(c, u, 6.0), u + 6 * (c - u))


def test_euler_ode_with_exact_velocity_reaches_gaussian_target() -> None:
    """Data x0 ~ N(m, s²) per dimension; the exact marginal velocity E[ε − x0 | x_σ] is linear in x_σ."""
    m = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5, 0.1], dtype=torch.float64)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        cov = sigma - (1 - sigma) * s**2
        return -m + cov / var * (x - (1 - sigma) * m)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 3, generator=g, dtype=torch.float64)
    sigmas = sampling_sigmas("euler", 100, 3.0).double()
    for sig, sig_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = euler_step(x, velocity(x, sig), sig, sig_next)
    torch.testing.assert_close(x.mean(0), m, atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(0), s, atol=0.02, rtol=0.02)


# --------------------------------------------------------------------------- prediction parameterisation


def test_x0_and_v_readings_convert_both_ways_and_agree_on_the_truth() -> None:
    from models.flow import output_from_velocity, output_from_x0, output_to_velocity, output_to_x0, prediction_loss

    x0, eps = _latents(3)
    sigma = torch.rand(2, 5, dtype=torch.float64) * 0.9 + 0.05
    x = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    for pred in ("v", "x0"):
        out = output_from_x0(x0, x, sigma, pred)  # what a perfect network of this kind outputs
        torch.testing.assert_close(out, v if pred == "v" else x0)
        torch.testing.assert_close(output_to_x0(out, x, sigma, pred), x0)
        torch.testing.assert_close(output_to_velocity(out, x, sigma, pred), v)
        torch.testing.assert_close(output_from_velocity(output_to_velocity(out, x, sigma, pred), x, sigma, pred), out)
        # the truth has zero loss in either space; an Euler step to 0 lands on x0
        for space in ("v", "x0"):
            assert prediction_loss(out, x0, eps, sigma, pred, space).abs().max() < 1e-10
        torch.testing.assert_close(euler_step(x, output_to_velocity(out, x, sigma, pred), sigma, 0.0), x0)
    # v-space loss on an x0 output is the x0 error over sigma^2 (sigma above the floor)
    sigma = sigma.clamp_min(0.2)
    x = add_noise(x0, eps, sigma)
    out = x0 + 0.1
    err = prediction_loss(out, x0, eps, sigma, "x0", "v", sigma_floor=0.2)
    s = sigma.view(2, 1, 5, 1, 1)
    torch.testing.assert_close(err.double(), (0.1 / s).pow(2).expand_as(err), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        output_to_x0(out, x, sigma, "eps")


def test_prediction_of_finds_the_worldDiT_inside_wrappers() -> None:
    from models.config import preset
    from models.dit import WorldDiT
    from models.flow import prediction_of

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    m = WorldDiT(preset("tiny"))
    assert prediction_of(m) == "x0" and prediction_of(Wrapper(m)) == "x0"
    with pytest.raises(ValueError, match="cannot tell"):
        prediction_of(torch.nn.Linear(2, 2))


def test_skip_x0_passes_clean_inputs_through_and_keeps_unit_variance_residuals() -> None:
    from models.flow import skip_x0

    x0, eps = _latents(1)
    x0 = 0.5 * x0  # data std 0.5, the coefficient's sigma_data
    sigma = torch.tensor([[0.0, 0.05, 0.3, 0.7, 1.0]] * 2, dtype=torch.float64)
    xs = add_noise(x0, eps, sigma)
    zero = skip_x0(torch.zeros_like(x0), xs, sigma, 0.5)
    assert torch.equal(zero[:, :, 0], x0[:, :, 0])  # sigma 0: the input itself, whatever the network says
    assert zero[:, :, 4].abs().max() == 0  # sigma 1: nothing of the noise is kept
    # The network's part that makes x̂0 exact has unit variance at every sigma (EDM's c_out).
    c_out = skip_x0(torch.ones_like(x0), xs, sigma, 0.5) - zero
    needed = (x0 - zero)[:, :, 1:] / c_out[:, :, 1:]
    assert 0.8 < float(needed.std()) < 1.2


def test_skip_preconditioning_makes_a_fresh_model_the_identity_on_clean_latents() -> None:
    from models.config import preset
    from models.dit import WorldDiT
    from tests.model_helpers import randomize

    cfg = preset("tiny")
    cfg.skip_sigma_data = 0.5
    m = randomize(WorldDiT(cfg)).eval()
    x = torch.randn(1, cfg.latent_channels, 4, 4, 4)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    with torch.no_grad():
        out = m(x, sigma, actions=torch.zeros(1, 4, dtype=torch.long), chunk_size=4)
    assert torch.allclose(out[:, :, :2], x[:, :, :2], atol=1e-6)
    assert not torch.allclose(out[:, :, 2:], x[:, :, 2:], atol=1e-2)  # noisy latents are the network's work
    cfg.prediction = "v"  # the skip builds x̂0: it has no meaning for a velocity output
    with pytest.raises(ValueError, match="skip_sigma_data"):
        WorldDiT(cfg)
