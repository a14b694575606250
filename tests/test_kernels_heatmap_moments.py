"""heatmap_moments: Triton (interpreter on CPU) vs reference vs scipy.stats skew / kurtosis.

Tolerances: vs scipy/numpy float64 results mean/m2 rtol 1e-5, skew/kurt atol 1e-4 + rtol 1e-5
(float32 segment sums, float64 combination); Triton vs reference forward the same; gradients
(closed-form cubic in z in the Triton backward vs torch autograd of the float64 reference)
rtol 1e-4 / atol 1e-4 of the gradient's scale; bf16 (GPU) vs the float32 result of the same
bf16 values: rtol 1e-4, atol 1e-3 (gradients: rtol 2e-2, atol 1e-2 of their scale).
"""
import importlib

import numpy as np
import pytest
import scipy.stats
import torch
from devices import DEV, gpu

from threempose.kernels import backend, heatmap_moments, heatmap_moments_reference, use_backend

mmod = importlib.import_module("threempose.kernels.heatmap_moments")


@pytest.fixture(params=[2048, 64], ids=["one-segment", "many-segments"])
def triton_backend(triton_backend, request, monkeypatch):
    monkeypatch.setattr(mmod, "_SEG", request.param)
    return request.param


def _scipy(h):
    x = h.detach().double().cpu().reshape(h.shape[0], h.shape[1], -1).numpy()
    return np.stack([x.mean(-1), x.var(-1), scipy.stats.skew(x, axis=-1),
                     scipy.stats.kurtosis(x, axis=-1, fisher=False)], axis=-1)


def _check_vs_scipy(out, h):
    ref = _scipy(h)
    got = out.detach().double().cpu().numpy()
    np.testing.assert_allclose(got[..., :2], ref[..., :2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[..., 2:], ref[..., 2:], rtol=1e-5, atol=1e-4)


def _heatmaps(B, J, H, W, seed):
    """Gaussian blobs (the predicted heatmaps' shape) plus noise, one offset map."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    cy = torch.rand(B, J, 1, 1, generator=gen) * H
    cx = torch.rand(B, J, 1, 1, generator=gen) * W
    sig = 1 + 2 * torch.rand(B, J, 1, 1, generator=gen)
    h = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig ** 2))
    h = h + 0.05 * torch.randn(B, J, H, W, generator=gen)
    h[0, 0] += 100.0                       # large mean, unit-scale spread: shift robustness
    return h.to(DEV)


@pytest.mark.parametrize("shape", [(2, 3, 13, 11), (1, 17, 5, 7), (3, 2, 1, 9), (2, 1, 32, 24)])
def test_matches_scipy_and_reference_forward_and_backward(triton_backend, shape):
    h = _heatmaps(*shape, seed=sum(shape)).requires_grad_(True)
    out = heatmap_moments(h)
    assert out.shape == (*shape[:2], 4) and out.dtype == torch.float32
    assert backend.launch_counts == {"moments_partial": 1, "moments_combine": 1}
    _check_vs_scipy(out, h)
    ref = heatmap_moments_reference(h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEV)
    (gx,) = torch.autograd.grad(out, h, g)
    assert backend.launch_counts["moments_bwd"] == 1
    (gx_ref,) = torch.autograd.grad(ref, h, g)
    scale = gx_ref.abs().amax(dim=(2, 3), keepdim=True)
    assert torch.all((gx - gx_ref).abs() <= 1e-4 * scale + 1e-4 * gx_ref.abs())


def test_gaussian_sample_has_kurtosis_three_not_excess(triton_backend):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 2, 101, 99, generator=gen).to(DEV)       # 9999 values per map
    out = heatmap_moments(h)
    _check_vs_scipy(out, h)
    assert torch.all((out[..., 3] - 3.0).abs() < 0.2)            # ~4 sigma of the estimator
    assert torch.all(out[..., 2].abs() < 0.1)


def test_flat_maps_give_zero_skew_and_kurtosis(triton_backend):
    h = torch.zeros(2, 3, 6, 5)
    h[0, 1] = 5.0                                                # constant, non-zero
    h[1, 0] = 0.25 + 1e-7 * torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    h[1, 1] = 3e-9 * torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    h[1, 2, 2, 3] = 1.0                                          # one peak: not flat
    h = h.to(DEV).requires_grad_(True)
    for fn in (heatmap_moments, heatmap_moments_reference):
        out = fn(h)
        flat = torch.ones(2, 3, dtype=torch.bool)
        flat[1, 2] = False
        assert torch.all(out[..., 2:][flat] == 0)
        torch.testing.assert_close(out[..., 0], h.detach().mean((2, 3)))
        _check_vs_scipy(out[1:, 2:], h[1:, 2:])
        (gx,) = torch.autograd.grad(out[..., 2:].sum(), h)       # only skew and kurt
        assert torch.isfinite(gx).all() and torch.all(gx[flat.to(DEV)] == 0)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"\[B, J, H, W\]"):
        heatmap_moments(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="empty maps"):
        heatmap_moments(torch.zeros(1, 1, 0, 4))


def test_float64_input_uses_the_reference_on_every_backend(triton_backend):
    h = _heatmaps(1, 2, 7, 9, seed=3).double()
    out = heatmap_moments(h)
    assert sum(backend.launch_counts.values()) == 0
    np.testing.assert_allclose(out.cpu().numpy(), _scipy(h), rtol=1e-6, atol=1e-6)


@gpu
def test_bf16_on_gpu_at_the_thesis_shape():
    h = _heatmaps(4, 17, 128, 128, seed=5).bfloat16().requires_grad_(True)
    with use_backend("triton"):
        out = heatmap_moments(h)
        (gx,) = torch.autograd.grad(out[..., 2:].sum(), h)
    ref = heatmap_moments_reference(h.float())
    (gx_ref,) = torch.autograd.grad(ref[..., 2:].sum(), h)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    scale = gx_ref.float().abs().max().item()
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=1e-2 * scale)
