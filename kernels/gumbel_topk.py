"""Gumbel top-k selection for all architecture rows in one launch (thesis §3.2.1, §3.3 Dyn-EGS).

For each row ``r`` of ``logits [N, K]``: add Gumbel noise ``g[r, c]``, keep the ``k[r]``
largest perturbed scores ``s = logits + g`` as a hard 0/1 mask (forward), and pass gradients
straight through ``softmax(s / tau)`` (backward). Dyn-EGS samples a state ``i`` from ``m``
(``k = 1``) and then the top ``i + 1`` ops/inputs of ``alpha``/``beta`` (``k = i + 1``); every
cell's rows go into one call (rows of different widths: pad with ``-inf`` logits, which are
never selected while ``k[r]`` does not exceed the row's finite entries).

Same seed, same mask, on every backend and device
-------------------------------------------------
The noise is a pure function of ``(seed, row, col)``: Philox4x32-10 (Random123; Triton's own
``tl.philox``) with counter ``(col, row, 0, 0)`` and key ``(seed mod 2**32, seed >> 32)``; its
first output word ``x`` (a uint32) becomes ``u = (x + 0.5) * 2**-32`` in float64 (exact, in
``(0, 1)``), then ``g = float32(-log(-log(u)))`` with the logarithms in float64. The reference
runs the very same Philox in integer torch arithmetic (:func:`philox4x32`, checked against the
Random123 known-answer vectors and against ``tl.philox``), so ``x`` and ``u`` are bit-identical
on every backend and device. The only non-bit-exact step is float64 ``log`` (correctly rounded
or within 1 ulp on CPU and in CUDA's libdevice); its result is rounded to float32, so ``g``
differs between implementations only if a float64 result straddles a float32 rounding
boundary (probability ~1e-9 per element). ``s = float32(logits) + g`` is a single IEEE add on
both paths and ties are broken by the lower column index on both paths, so the masks agree
except in such a ~1e-9 event. The noise does not depend on ``K`` or ``N``: row ``r``, column
``c`` of seed ``s`` always gets the same ``g``.

This module holds the Triton kernels (``_gumbel_topk_fwd_kernel``, ``_gumbel_topk_bwd_kernel``,
``_gumbel_noise_kernel``), the autograd wrapper :class:`GumbelTopkFunction`, the PyTorch
reference (:func:`gumbel_topk_reference`, :func:`philox4x32`, :func:`gumbel_noise_reference`)
and the public entry points :func:`gumbel_topk` and :func:`gumbel_noise`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import launch, resolve, tl, triton

__all__ = ["gumbel_topk", "gumbel_topk_reference", "gumbel_noise", "gumbel_noise_reference",
           "philox4x32", "GumbelTopkFunction"]

_BLOCK_N = 32          # rows per program
_NUM_WARPS = 4
_TWO_POW_M32 = 2.3283064365386963e-10      # 2**-32, exact in float64

# Philox4x32-10 constants (Random123; identical to triton.language.random).
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _gumbel_noise_tile(seed, rows, cols):
    """Gumbel noise (float32) for int32 index tiles ``rows``/``cols`` of one shape."""
    zero = rows * 0
    x, _, _, _ = tl.philox(seed, cols, rows, zero, zero)           # uint32
    u = (x.to(tl.float64) + 0.5) * 2.3283064365386963e-10          # (0, 1), exact
    return (-tl.log(-tl.log(u))).to(tl.float32)


@triton.jit
def _row_tile(N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's ``BLOCK_N`` rows of an ``[N, K]`` matrix: the row indices ``[BLOCK_N]``, the
    row and column index of every element ``[BLOCK_N, BLOCK_K]`` and the in-bounds mask."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    rows2 = rows[:, None] + cols[None, :] * 0
    cols2 = cols[None, :] + rows[:, None] * 0
    return rows, rows2, cols2, (rows2 < N) & (cols2 < K)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_noise_kernel(
    g_ptr,               # [N, K] float32 out
    N, K, seed,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, rows2, cols2, m2 = _row_tile(N, K, BLOCK_N, BLOCK_K)
    g = _gumbel_noise_tile(seed, rows2, cols2)
    tl.store(g_ptr + rows2.to(tl.int64) * K + cols2, g, mask=m2)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_topk_fwd_kernel(
    logits_ptr,          # [N, K] contiguous, any float dtype
    k_ptr,               # [N] integer: how many to keep per row (clamped to 0..K)
    mask_ptr,            # [N, K] out, logits dtype: hard 0/1 mask
    soft_ptr,            # [N, K] out, float32: softmax((logits + g) / tau)
    N, K, tau, seed,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, rows2, cols2, m2 = _row_tile(N, K, BLOCK_N, BLOCK_K)
    offs = rows2.to(tl.int64) * K + cols2
    z = tl.load(logits_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    g = _gumbel_noise_tile(seed, rows2, cols2)
    s = tl.where(m2, z + g, float("-inf"))
    # rank[r, j] = #{i : s_i > s_j or (s_i == s_j and i < j)}; keep rank < k[r].
    rank = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for i in range(K):
        s_i = tl.max(tl.where(cols2 == i, s, float("-inf")), axis=1)[:, None]
        beats = (s_i > s) | ((s_i == s) & (cols2 > i))
        rank += beats.to(tl.int32)
    kk = tl.load(k_ptr + rows, mask=rows < N, other=0).to(tl.int32)
    kk = tl.minimum(tl.maximum(kk, 0), K)
    sel = rank < kk[:, None]
    tl.store(mask_ptr + offs, sel.to(mask_ptr.dtype.element_ty), mask=m2)
    # straight-through surrogate: softmax(s / tau) over the row (all -inf row -> zeros)
    t = s / tau
    mx = tl.max(t, axis=1)[:, None]
    finite = m2 & (mx > float("-inf"))
    e = tl.where(finite, tl.exp(t - tl.where(finite, mx, 0.0)), 0.0)
    den = tl.sum(e, axis=1)[:, None]
    tl.store(soft_ptr + offs, e / tl.where(den > 0, den, 1.0), mask=m2)


@triton.jit
def _gumbel_topk_bwd_kernel(
    soft_ptr,            # [N, K] float32 saved softmax y
    gy_ptr,              # [N, K] float32 upstream gradient (mask's + soft's)
    gl_ptr,              # [N, K] out, logits dtype: y * (gy - <gy, y>) / tau
    N, K, tau,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _, rows2, cols2, m2 = _row_tile(N, K, BLOCK_N, BLOCK_K)
    offs = rows2.to(tl.int64) * K + cols2
    y = tl.load(soft_ptr + offs, mask=m2, other=0.0)
    gy = tl.load(gy_ptr + offs, mask=m2, other=0.0)
    dot = tl.sum(y * gy, axis=1)[:, None]
    tl.store(gl_ptr + offs, (y * (gy - dot) / tau).to(gl_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- #
# PyTorch reference: the same Philox in integer torch arithmetic
# --------------------------------------------------------------------------- #
def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * b`` (a: uint32 constant, b: int64 in [0, 2**32))."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi                       # < 2**33
    lo_full = a_lo * b_lo + ((mid & 0xFFFF) << 16)        # < 2**33
    hi = a_hi * b_hi + (mid >> 16) + (lo_full >> 32)
    return hi & _M32, lo_full & _M32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` (Random123) on int64 tensors holding uint32 values.

    Args:
        c0, c1, c2, c3: counter words, int64 tensors of one shape, values in ``[0, 2**32)``.
        k0, k1: key words in ``[0, 2**32)``.

    Returns:
        The four output words, int64 tensors with values in ``[0, 2**32)``.
    """
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def gumbel_noise_reference(n_rows: int, n_cols: int, seed: int,
                           device: torch.device | str = "cpu") -> Tensor:
    """Gumbel noise ``g[r, c]`` of :func:`gumbel_noise` in PyTorch: ``[n_rows, n_cols]`` float32."""
    seed = _check_seed(seed)
    rows = torch.arange(n_rows, dtype=torch.int64, device=device)[:, None].expand(n_rows, n_cols)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)[None, :].expand(n_rows, n_cols)
    zero = torch.zeros_like(rows)
    x, _, _, _ = philox4x32(cols, rows, zero, zero, seed & _M32, seed >> 32)
    u = (x.double() + 0.5) * _TWO_POW_M32
    return (-torch.log(-torch.log(u))).float()


def _topk_mask_and_soft(logits: Tensor, k: Tensor, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    N, K = logits.shape
    g = gumbel_noise_reference(N, K, seed, logits.device)
    s = logits.float() + g
    # stable descending sort: ties keep column order, i.e. the lower column index wins
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(K, device=logits.device).expand(N, K).contiguous())
    kk = k.to(torch.int64).clamp(0, K)
    mask = (rank < kk[:, None]).to(logits.dtype)
    t = s / tau
    mx = t.amax(dim=1, keepdim=True)
    finite = mx > float("-inf")
    e = torch.where(finite, torch.exp(t - torch.where(finite, mx, torch.zeros_like(mx))),
                    torch.zeros_like(t))
    den = e.sum(dim=1, keepdim=True)
    soft = e / torch.where(den > 0, den, torch.ones_like(den))
    return mask, soft


def _softmax_vjp(soft: Tensor, gy: Tensor, tau: float) -> Tensor:
    """``J^T gy`` for ``y = softmax(s / tau)``: ``y * (gy - <gy, y>) / tau`` per row."""
    return soft * (gy - (soft * gy).sum(dim=1, keepdim=True)) / tau


class _GumbelTopkReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, tau, seed):
        mask, soft = _topk_mask_and_soft(logits, k, tau, seed)
        ctx.tau = tau
        ctx.save_for_backward(soft)
        return mask, soft

    @staticmethod
    def backward(ctx, g_mask, g_soft):
        (soft,) = ctx.saved_tensors
        gy = g_mask.float() + g_soft.float()
        gl = _softmax_vjp(soft, gy, ctx.tau).to(g_mask.dtype)
        return gl, None, None, None


# --------------------------------------------------------------------------- #
# Autograd wrapper (Triton)
# --------------------------------------------------------------------------- #
class GumbelTopkFunction(torch.autograd.Function):
    """Triton Gumbel top-k. ``apply(logits, k, tau, seed) -> (mask, soft)``; both outputs share
    the straight-through Jacobian of ``softmax((logits + g) / tau)``."""

    @staticmethod
    def forward(ctx, logits, k, tau, seed):
        logits = logits.contiguous()
        N, K = logits.shape
        mask = torch.empty_like(logits)
        soft = torch.empty((N, K), dtype=torch.float32, device=logits.device)
        if N and K:
            launch("gumbel_topk_fwd", _gumbel_topk_fwd_kernel, (triton.cdiv(N, _BLOCK_N),),
                   logits, k.contiguous(), mask, soft, N, K, float(tau), seed,
                   BLOCK_N=_BLOCK_N, BLOCK_K=triton.next_power_of_2(K), num_warps=_NUM_WARPS)
        ctx.tau = float(tau)
        ctx.save_for_backward(soft)
        return mask, soft

    @staticmethod
    def backward(ctx, g_mask, g_soft):
        (soft,) = ctx.saved_tensors
        N, K = soft.shape
        gy = (g_mask.float() + g_soft.float()).contiguous()
        gl = torch.empty(soft.shape, dtype=g_mask.dtype, device=soft.device)
        if N and K:
            launch("gumbel_topk_bwd", _gumbel_topk_bwd_kernel, (triton.cdiv(N, _BLOCK_N),),
                   soft, gy, gl, N, K, ctx.tau, BLOCK_N=_BLOCK_N,
                   BLOCK_K=triton.next_power_of_2(K), num_warps=_NUM_WARPS)
        return gl, None, None, None


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"gumbel_topk: seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _validate(logits: Tensor, k, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("gumbel_topk: logits must be a floating-point [N, K] tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    N = logits.shape[0]
    if isinstance(k, int) and not isinstance(k, bool):
        k = torch.full((N,), k, dtype=torch.int32, device=logits.device)
    if (not isinstance(k, Tensor) or k.shape != (N,) or k.is_floating_point()
            or k.dtype == torch.bool):
        raise ValueError(f"gumbel_topk: k must be an integer tensor of shape [N] = [{N}] "
                         f"(or a Python int), got {getattr(k, 'shape', k)!r} "
                         f"{getattr(k, 'dtype', '')}")
    if k.device != logits.device:
        raise ValueError(f"gumbel_topk: k is on {k.device}, logits on {logits.device}")
    tau = float(tau)
    if not (tau > 0.0 and tau < float("inf")):
        raise ValueError(f"gumbel_topk: tau must be a positive finite float, got {tau}")
    _check_seed(seed)
    return logits, k


def gumbel_topk_reference(logits: Tensor, k, tau: float, seed: int,
                          return_soft: bool = False):
    """PyTorch reference of :func:`gumbel_topk` (same arguments, same masks, same noise)."""
    logits, k = _validate(logits, k, tau, seed)
    mask, soft = _GumbelTopkReference.apply(logits, k, float(tau), int(seed))
    return (mask, soft) if return_soft else mask


def gumbel_topk(logits: Tensor, k, tau: float, seed: int, return_soft: bool = False):
    """Per-row Gumbel top-k: a hard mask forward, straight-through softmax gradients backward.

    Args:
        logits: ``[N, K]`` floating-point scores (architecture parameters; pad ragged rows with
            ``-inf``).
        k: ``[N]`` integer tensor (or a Python int for every row): ones to keep per row,
            clamped to ``0..K``.
        tau: Gumbel-softmax temperature (> 0; the thesis anneals 10 -> 0.001).
        seed: int in ``[0, 2**63)``; the noise is a function of ``(seed, row, col)`` only
            (see the module docstring: same seed, same mask on every backend and device).
        return_soft: also return ``softmax((logits + g) / tau)`` (float32, differentiable).

    Returns:
        ``mask [N, K]`` in the logits' dtype with exactly ``clamp(k[r], 0, K)`` ones in row
        ``r`` (ties between equal perturbed scores go to the lower column index), or
        ``(mask, soft)`` when ``return_soft``. ``d mask / d logits`` is the Jacobian of
        ``softmax((logits + g) / tau)`` (straight-through); the forward value is exactly 0/1.
        All rows are computed in one Triton launch.
    """
    logits, k = _validate(logits, k, tau, seed)
    if resolve("gumbel_topk", logits, k) == "triton":
        mask, soft = GumbelTopkFunction.apply(logits, k, float(tau), int(seed))
    else:
        mask, soft = _GumbelTopkReference.apply(logits, k, float(tau), int(seed))
    return (mask, soft) if return_soft else mask


def gumbel_noise(n_rows: int, n_cols: int, seed: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """The Gumbel noise :func:`gumbel_topk` adds: ``[n_rows, n_cols]`` float32, ``g[r, c]`` a
    function of ``(seed, r, c)`` only (Philox4x32-10; bit-identical uniforms on all backends)."""
    seed = _check_seed(seed)
    probe = torch.empty(0, device=device)
    if resolve("gumbel_noise", probe) == "triton":
        g = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
        if n_rows and n_cols:
            launch("gumbel_noise", _gumbel_noise_kernel, (triton.cdiv(n_rows, _BLOCK_N),),
                   g, n_rows, n_cols, seed, BLOCK_N=_BLOCK_N,
                   BLOCK_K=triton.next_power_of_2(n_cols), num_warps=_NUM_WARPS)
        return g
    return gumbel_noise_reference(n_rows, n_cols, seed, device)
