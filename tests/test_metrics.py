"""PSNR and SSIM: analytic values, invariances, and SSIM against a direct per-window implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.metrics import SSIM_K1, SSIM_K2, gaussian_window, psnr, ssim, to_float_frames


def _frames(b: int = 3, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)


def _naive_ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one single-channel image pair [H, W] written straight from the formula, window by window."""
    g1 = gaussian_window(window, sigma).numpy()
    w = np.outer(g1, g1)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    vals = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            pa, pb = a[i : i + window, j : j + window], b[i : i + window, j : j + window]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_identical_frames_give_inf_psnr_and_unit_ssim() -> None:
    x = _frames()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ssim(x, x, channels="luma"), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_constant_offset_has_analytic_psnr() -> None:
    x = 0.2 + 0.5 * _frames()
    for delta in (0.1, 0.01, 0.3):
        expected = -20.0 * math.log10(delta)
        torch.testing.assert_close(psnr(x, x + delta), torch.full((3,), expected, dtype=torch.float64))
    # data_range scales the peak: the same offset on a 0..255 float image is the same PSNR.
    torch.testing.assert_close(psnr(255 * x, 255 * x + 25.5, data_range=255.0), psnr(x, x + 0.1))


def test_uint8_frames_are_converted_like_float_frames() -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 246, (2, 16, 18, 3), dtype=torch.uint8, generator=g)
    v = u + 10
    expected = -20.0 * math.log10(10 / 255)
    torch.testing.assert_close(psnr(u, v), torch.full((2,), expected, dtype=torch.float64))
    torch.testing.assert_close(ssim(u, v), ssim(to_float_frames(u), to_float_frames(v)))
    with pytest.raises(ValueError, match="data_range must be 1.0"):
        psnr(u, v, data_range=255.0)


def test_ssim_matches_direct_formula_on_small_images() -> None:
    a = _frames(b=2, h=15, w=13, seed=2)
    b = (a + 0.15 * _frames(b=2, h=15, w=13, seed=3)).clamp(0, 1)
    got_rgb = ssim(a, b)
    got_luma = ssim(a, b, channels="luma")
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    ya, yb = (a * luma).sum(1), (b * luma).sum(1)
    for n in range(2):
        rgb = np.mean([_naive_ssim(a[n, c].numpy(), b[n, c].numpy()) for c in range(3)])
        assert got_rgb[n].item() == pytest.approx(rgb, abs=1e-10)
        assert got_luma[n].item() == pytest.approx(_naive_ssim(ya[n].numpy(), yb[n].numpy()), abs=1e-10)


def test_ssim_is_symmetric_and_decreases_with_noise() -> None:
    x = _frames(b=2, h=32, w=32, seed=4)
    # Smooth the image so that structure exists for noise to destroy.
    x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = (x + 0.1 * noise).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    values = [ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.0, 0.02, 0.05, 0.1, 0.3)]
    for hi, lo in zip(values, values[1:]):
        assert (lo < hi).all(), (hi, lo)
    assert (values[-1] < 0.5).all()


def test_batched_values_equal_per_frame_values() -> None:
    a, b = _frames(b=4, seed=6), _frames(b=4, seed=7)
    s, p = ssim(a, b), psnr(a, b)
    for n in range(4):
        torch.testing.assert_close(ssim(a[n : n + 1], b[n : n + 1]), s[n : n + 1])
        torch.testing.assert_close(psnr(a[n : n + 1], b[n : n + 1]), p[n : n + 1])


def test_float32_inputs_agree_with_float64() -> None:
    a, b = _frames(seed=8), _frames(seed=9)
    torch.testing.assert_close(ssim(a.float(), b.float()), ssim(a, b), atol=1e-6, rtol=0)
    torch.testing.assert_close(psnr(a.float(), b.float()), psnr(a, b), atol=1e-4, rtol=0)


def test_bad_inputs_raise_clear_errors() -> None:
    x = _frames()
    with pytest.raises(ValueError, match=r"a and b must have the same shape"):
        psnr(x, x[:, :, :10])
    with pytest.raises(ValueError, match=r"b: float frames must be \[B, 3, H, W\]"):
        ssim(x, x.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"a: uint8 frames must be \[B, H, W, 3\]"):
        psnr(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), x)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10], x[..., :10])
    with pytest.raises(ValueError, match="channels must be"):
        ssim(x, x, channels="yuv")  # type: ignore[arg-type]
