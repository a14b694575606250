"""Heatmap moment statistics for dynamic inference (thesis §3.1.4, Eq. 3.1-3.3).

Per heatmap (``H * W = n`` values) the population moments
``m_k = (1/n) sum_i (x_i - mean)^k`` and::

    skew = m3 / m2^1.5          (Eq. 3.1)
    kurt = m4 / m2^2            (Eq. 3.2; plain kurtosis, NOT excess: a Gaussian sample gives ~3)

``heatmap_moments`` returns ``[B, J, 4] = (mean, m2, skew, kurt)`` in float32.

Flat maps. A map is *flat* when ``m2 <= (FLAT_RTOL * mean)^2 + FLAT_ATOL^2``, i.e. its standard
deviation is below ``1e-5 * |mean|`` (about 80 float32 ulps of the mean: below that the
deviations are rounding noise) or below ``1e-8`` in absolute terms (below that ``m2^2`` leaves
float32's normal range). Flat maps report their mean and m2 but ``skew = kurt = 0`` (with zero
gradient through skew and kurt). Scale the input if you need the shape of maps whose standard
deviation is below 1e-8.

One pass, numerically careful. The Triton path reads every value once: a program loads one
segment of ``SEG`` values into registers and computes, about the segment's provisional mean
``a``, ``S1 = sum(x - a)`` and ``Mp = sum((x - a)^p)`` for p = 2, 3, 4 in float32 (so each term is
rounded relative to the deviation, not to the mean). A second tiny kernel (one program per map)
shifts the segments' sums exactly to the grand mean with the binomial identities in float64
(Pébay-style parallel combination). Errors are those of float32 sums of ``SEG`` deviation
powers: relative ~1e-6 on m2 and m4, and ~1e-6 * E|d|^3 / m2^1.5 absolute on skew; the tests
hold the kernel to scipy's float64 results at 1e-4. The PyTorch reference is a float64
two-pass computation.

Backward (both paths): ``d stats / d x`` is a cubic in ``z = (x - mean) / sqrt(m2)`` per map;
the Triton backward evaluates it in one elementwise pass with per-map coefficients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import launch, resolve, tl, triton, unsupported_dtype

__all__ = ["heatmap_moments", "heatmap_moments_reference", "HeatmapMomentsFunction",
           "FLAT_RTOL", "FLAT_ATOL"]

FLAT_RTOL = 1e-5
FLAT_ATOL = 1e-8
_SEG = 2048            # values per program (one register tile); memory-bound, untuned
_NUM_WARPS = 8
_BLOCK_S = 64          # segments per step in the combine kernel


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _moments_partial_kernel(
    x_ptr,               # [M, n] maps, any float dtype
    part_ptr,            # [M, S, 5] float32 out: a, S1, M2, M3, M4 about the provisional mean a
    n, S,
    SEG: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs = s * SEG + tl.arange(0, SEG)
    valid = offs < n
    x = tl.load(x_ptr + m * n + offs, mask=valid, other=0.0).to(tl.float32)
    cnt = tl.minimum(n - s * SEG, SEG).to(tl.float32)
    a = tl.sum(x, axis=0) / cnt
    d = tl.where(valid, x - a, 0.0)
    d2 = d * d
    base = part_ptr + (m * S + s) * 5
    tl.store(base + 0, a)
    tl.store(base + 1, tl.sum(d, axis=0))
    tl.store(base + 2, tl.sum(d2, axis=0))
    tl.store(base + 3, tl.sum(d2 * d, axis=0))
    tl.store(base + 4, tl.sum(d2 * d2, axis=0))


@triton.jit(do_not_specialize=["n", "S"])   # n is used as a tensor (n == 1 must not be constexpr)
def _moments_combine_kernel(
    part_ptr,            # [M, S, 5] float32
    out_ptr,             # [M, 4] float32: mean, m2, skew, kurt
    n, S,
    FLAT_R: tl.constexpr, FLAT_A: tl.constexpr, SEG: tl.constexpr, BLOCK_S: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    base = part_ptr + m * S * 5
    nf = n.to(tl.float64)
    # pass 1: the grand mean, sum_s (n_s * a_s + S1_s) / n
    tot = tl.zeros([BLOCK_S], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        si = s0 + tl.arange(0, BLOCK_S)
        ok = si < S
        ns = tl.where(ok, tl.minimum(n - si * SEG, SEG), 0).to(tl.float64)
        a = tl.load(base + si * 5 + 0, mask=ok, other=0.0).to(tl.float64)
        s1 = tl.load(base + si * 5 + 1, mask=ok, other=0.0).to(tl.float64)
        tot += ns * a + s1
    mu = tl.sum(tot, axis=0) / nf
    # pass 2: shift each segment's sums from a_s to mu (binomial identities, float64)
    c2 = tl.zeros([BLOCK_S], dtype=tl.float64)
    c3 = tl.zeros([BLOCK_S], dtype=tl.float64)
    c4 = tl.zeros([BLOCK_S], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        si = s0 + tl.arange(0, BLOCK_S)
        ok = si < S
        ns = tl.where(ok, tl.minimum(n - si * SEG, SEG), 0).to(tl.float64)
        a = tl.load(base + si * 5 + 0, mask=ok, other=0.0).to(tl.float64)
        s1 = tl.load(base + si * 5 + 1, mask=ok, other=0.0).to(tl.float64)
        p2 = tl.load(base + si * 5 + 2, mask=ok, other=0.0).to(tl.float64)
        p3 = tl.load(base + si * 5 + 3, mask=ok, other=0.0).to(tl.float64)
        p4 = tl.load(base + si * 5 + 4, mask=ok, other=0.0).to(tl.float64)
        e = tl.where(ok, a - mu, 0.0)
        e2 = e * e
        c2 += p2 + 2.0 * e * s1 + ns * e2
        c3 += p3 + 3.0 * e * p2 + 3.0 * e2 * s1 + ns * e2 * e
        c4 += p4 + 4.0 * e * p3 + 6.0 * e2 * p2 + 4.0 * e2 * e * s1 + ns * e2 * e2
    m2 = tl.maximum(tl.sum(c2, axis=0) / nf, 0.0)
    m3 = tl.sum(c3, axis=0) / nf
    m4 = tl.sum(c4, axis=0) / nf
    thr = FLAT_R * mu
    flat = m2 <= thr * thr + FLAT_A * FLAT_A
    m2s = tl.where(flat, 1.0, m2)
    skew = tl.where(flat, 0.0, m3 / (m2s * tl.sqrt(m2s)))
    kurt = tl.where(flat, 0.0, m4 / (m2s * m2s))
    tl.store(out_ptr + m * 4 + 0, mu.to(tl.float32))
    tl.store(out_ptr + m * 4 + 1, m2.to(tl.float32))
    tl.store(out_ptr + m * 4 + 2, skew.to(tl.float32))
    tl.store(out_ptr + m * 4 + 3, kurt.to(tl.float32))


@triton.jit
def _moments_bwd_kernel(
    x_ptr,               # [M, n] input maps
    coef_ptr,            # [M, 6] float32: mean, 1/sigma_eff, b0, b1, b2, b3
    gx_ptr,              # [M, n] out, input dtype: b0 + b1 z + b2 z^2 + b3 z^3, z = (x-mean)/sigma
    n,
    SEG: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * SEG + tl.arange(0, SEG)
    valid = offs < n
    x = tl.load(x_ptr + m * n + offs, mask=valid, other=0.0).to(tl.float32)
    c = coef_ptr + m * 6
    z = (x - tl.load(c + 0)) * tl.load(c + 1)
    g = tl.load(c + 2) + z * (tl.load(c + 3) + z * (tl.load(c + 4) + z * tl.load(c + 5)))
    tl.store(gx_ptr + m * n + offs, g.to(gx_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- #
# Autograd wrapper (Triton)
# --------------------------------------------------------------------------- #
def _backward_coefficients(stats: Tensor, g: Tensor, n: int) -> Tensor:
    """Per-map ``[M, 6]`` (mean, 1/sigma_eff, b0..b3) with ``dL/dx = b0 + b1 z + b2 z^2 + b3 z^3``.

    With sigma = sqrt(m2), d = x - mean, z = d / sigma (sigma_eff = 1 and no skew/kurt terms for
    flat maps, whose skew and kurt are constants):
    ``dmean/dx = 1/n``, ``dm2/dx = 2d/n``, ``dm3/dx = 3(d^2 - m2)/n``, ``dm4/dx = 4(d^3 - m3)/n``,
    ``dskew = dm3/sigma^3 - 1.5 m3 dm2/sigma^5``, ``dkurt = dm4/sigma^4 - 2 m4 dm2/sigma^6``.
    """
    st = stats.double()
    gd = g.double()
    mean, m2, skew, kurt = st.unbind(-1)
    g_mean, g_m2, g_skew, g_kurt = gd.unbind(-1)
    flat = kurt == 0          # a non-flat map has kurt >= 1 + skew^2 >= 1
    g_skew = torch.where(flat, 0.0, g_skew)
    g_kurt = torch.where(flat, 0.0, g_kurt)
    sigma = torch.where(flat, 1.0, m2.clamp_min(0).sqrt())
    inv = 1.0 / sigma
    b0 = (g_mean - 3.0 * g_skew * inv - 4.0 * g_kurt * skew * inv) / n
    b1 = (2.0 * g_m2 * sigma - 3.0 * g_skew * skew * inv - 4.0 * g_kurt * kurt * inv) / n
    b2 = 3.0 * g_skew * inv / n
    b3 = 4.0 * g_kurt * inv / n
    return torch.stack([mean, inv, b0, b1, b2, b3], dim=-1).float().contiguous()


class HeatmapMomentsFunction(torch.autograd.Function):
    """Triton heatmap moments. ``apply(heatmaps [B, J, H, W]) -> [B, J, 4]`` float32."""

    @staticmethod
    def forward(ctx, heatmaps: Tensor) -> Tensor:
        B, J, H, W = heatmaps.shape
        n, M = H * W, B * J
        x = heatmaps.contiguous()
        S = triton.cdiv(n, _SEG)
        part = torch.empty((M, S, 5), dtype=torch.float32, device=x.device)
        out = torch.empty((M, 4), dtype=torch.float32, device=x.device)
        if M:
            launch("moments_partial", _moments_partial_kernel, (M, S), x, part, n, S,
                   SEG=_SEG, num_warps=_NUM_WARPS)
            launch("moments_combine", _moments_combine_kernel, (M,), part, out, n, S,
                   FLAT_R=FLAT_RTOL, FLAT_A=FLAT_ATOL, SEG=_SEG, BLOCK_S=_BLOCK_S, num_warps=2)
        ctx.save_for_backward(x, out)
        return out.view(B, J, 4)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, out = ctx.saved_tensors
        B, J, H, W = x.shape
        n, M = H * W, B * J
        coef = _backward_coefficients(out, g.reshape(M, 4), n)
        gx = torch.empty_like(x)
        if M:
            launch("moments_bwd", _moments_bwd_kernel, (M, triton.cdiv(n, _SEG)), x, coef, gx, n,
                   SEG=_SEG, num_warps=_NUM_WARPS)
        return gx


# --------------------------------------------------------------------------- #
# PyTorch reference (float64 two-pass)
# --------------------------------------------------------------------------- #
def heatmap_moments_reference(heatmaps: Tensor) -> Tensor:
    """PyTorch reference of :func:`heatmap_moments`: float64 two-pass, autograd by torch."""
    _validate(heatmaps)
    B, J = heatmaps.shape[:2]
    x = heatmaps.reshape(B, J, -1).double()
    mean = x.mean(-1)
    d = x - mean[..., None]
    d2 = d * d
    m2 = d2.mean(-1)
    m3 = (d2 * d).mean(-1)
    m4 = (d2 * d2).mean(-1)
    flat = m2 <= (FLAT_RTOL * mean) ** 2 + FLAT_ATOL ** 2
    m2s = torch.where(flat, torch.ones_like(m2), m2)       # no inf/nan in the unused branch
    skew = torch.where(flat, torch.zeros_like(m3), m3 / m2s ** 1.5)
    kurt = torch.where(flat, torch.zeros_like(m4), m4 / m2s ** 2)
    return torch.stack([mean, m2, skew, kurt], dim=-1).float()


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def _validate(heatmaps: Tensor) -> None:
    if not isinstance(heatmaps, Tensor) or heatmaps.dim() != 4 or not heatmaps.is_floating_point():
        raise ValueError("heatmap_moments: heatmaps must be a floating-point [B, J, H, W] tensor, "
                         f"got {getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    if heatmaps.shape[2] * heatmaps.shape[3] == 0:
        raise ValueError(f"heatmap_moments: empty maps (H * W = 0) in shape "
                         f"{tuple(heatmaps.shape)}")


def heatmap_moments(heatmaps: Tensor) -> Tensor:
    """Per-map mean, second central moment, skew and kurtosis (thesis Eq. 3.1-3.3).

    Args:
        heatmaps: ``[B, J, H, W]`` floating point (predicted heatmaps, any units).

    Returns:
        ``[B, J, 4]`` float32: ``(mean, m2, skew = m3 / m2^1.5, kurt = m4 / m2^2)`` with
        population moments (divide by ``n = H * W``); kurt is plain kurtosis (3 for a Gaussian
        sample), not excess. Flat maps (``m2 <= (1e-5 * mean)^2 + (1e-8)^2``) give skew = kurt =
        0. Differentiable w.r.t. ``heatmaps``. float64 input takes the reference on every
        backend.
    """
    _validate(heatmaps)
    if resolve("heatmap_moments", heatmaps, unsupported=unsupported_dtype(heatmaps)) == "triton":
        return HeatmapMomentsFunction.apply(heatmaps)
    return heatmap_moments_reference(heatmaps)
