"""Fused mixed-op sum ``h = sum_k w[k] * O_k`` (thesis Eq. 3.6's weighted op sum), with autograd.

A supernet edge computes its candidate ops ``O_k(x)`` and mixes them with the sampled
architecture weights ``w`` (Dyn-EGS straight-through weights: exactly 0/1 in the forward, soft
gradients in the backward). This module holds, side by side:

* ``_mixed_op_sum_fwd_kernel`` / ``_mixed_op_sum_bwd_kernel``: the Triton kernels. All K
  outputs go to one launch as a tuple of pointers; the forward skips the load of every output
  whose weight is exactly zero (no memory traffic for ops the sampler switched off), the
  backward writes every ``dL/dO_k = w[k] * dL/dh`` and the per-block partial dot products
  ``<dL/dh, O_k>`` for ``dL/dw`` in one pass over ``dL/dh``.
* :class:`MixedOpSumFunction`: the autograd wrapper around them.
* :func:`mixed_op_sum_reference`: the PyTorch reference (same semantics, same zero-skip).
* :func:`mixed_op_sum`: the public entry point, dispatching through :mod:`.backend`.

Accumulation is in float32 for every input dtype; the result has the outputs' (promoted) dtype.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from .backend import launch, resolve, tl, triton, unsupported_dtype

__all__ = ["mixed_op_sum", "mixed_op_sum_reference", "MixedOpSumFunction"]

_BLOCK = 2048      # elements per program; memory-bound, untuned (no GPU in the authoring session)
_NUM_WARPS = 8


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _mixed_op_sum_fwd_kernel(
    x_ptrs,              # tuple of K pointers, each to n elements (the op outputs O_k)
    w_ptr,               # [K] weights (any float dtype)
    y_ptr,               # [n] result, dtype of the O_k
    n,                   # number of elements of one output
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + k).to(tl.float32)
        if w != 0.0:  # exactly-zero weights: O_k is never read
            x = tl.load(x_ptrs[k] + offs, mask=mask, other=0.0)
            acc += w * x.to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_op_sum_bwd_kernel(
    x_ptrs,              # tuple of K pointers to the saved O_k (read only if NEED_GW)
    gx_ptrs,             # tuple of K pointers to dL/dO_k (written where bit k of NEED_GX)
    w_ptr,               # [K] weights
    gy_ptr,              # [n] dL/dh
    gw_part_ptr,         # [num_programs, K] float32 partial sums of <dL/dh, O_k>
    n,
    K: tl.constexpr,
    NEED_GX: tl.constexpr,   # bit mask: bit k set = O_k needs a gradient
    NEED_GW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        if (NEED_GX >> k) & 1:
            w = tl.load(w_ptr + k).to(tl.float32)
            tl.store(gx_ptrs[k] + offs, (w * gy).to(gx_ptrs[k].dtype.element_ty), mask=mask)
        if NEED_GW:
            x = tl.load(x_ptrs[k] + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(gw_part_ptr + pid * K + k, tl.sum(gy * x, axis=0))


# --------------------------------------------------------------------------- #
# Layout helpers
# --------------------------------------------------------------------------- #
def _memory_format(t: Tensor) -> torch.memory_format:
    """The dense layout a kernel can walk linearly: channels_last kept as is, else contiguous."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _dense(ts: Sequence[Tensor], fmt: torch.memory_format) -> list[Tensor]:
    return [t.contiguous(memory_format=fmt) for t in ts]


# --------------------------------------------------------------------------- #
# Autograd wrapper (Triton)
# --------------------------------------------------------------------------- #
class MixedOpSumFunction(torch.autograd.Function):
    """``h = sum_k w[k] * O_k`` with the Triton kernels. ``apply(weights, *outputs)``."""

    @staticmethod
    def forward(ctx, weights: Tensor, *outputs: Tensor) -> Tensor:
        fmt = _memory_format(outputs[0])
        xs = _dense(outputs, fmt)
        w = weights.contiguous()
        y = torch.empty_like(xs[0], memory_format=fmt)
        n = y.numel()
        if n:
            launch("mixed_op_sum_fwd", _mixed_op_sum_fwd_kernel, (triton.cdiv(n, _BLOCK),),
                   tuple(xs), w, y, n, K=len(xs), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.fmt = fmt
        ctx.need_gw = bool(ctx.needs_input_grad[0])
        # O_k are needed only for dL/dw; the weights are tiny.
        ctx.save_for_backward(w, *(xs if ctx.need_gw else ()))
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        w, *xs = ctx.saved_tensors
        need_gx = [bool(b) for b in ctx.needs_input_grad[1:]]
        K = len(need_gx)
        gy = gy.contiguous(memory_format=ctx.fmt)
        n = gy.numel()
        gxs = [torch.empty_like(gy) if need else None for need in need_gx]
        grid = triton.cdiv(n, _BLOCK)
        gw_part = torch.empty((max(grid, 1), K) if ctx.need_gw else (1,), device=gy.device,
                              dtype=torch.float32)
        mask_bits = sum(1 << k for k in range(K) if need_gx[k])
        if n and (mask_bits or ctx.need_gw):
            # Unused tuple slots get a placeholder pointer that the kernel never touches.
            x_args = tuple(xs) if ctx.need_gw else (gy,) * K
            gx_args = tuple(g if g is not None else gy for g in gxs)
            launch("mixed_op_sum_bwd", _mixed_op_sum_bwd_kernel, (grid,), x_args, gx_args, w, gy,
                   gw_part, n, K=K, NEED_GX=mask_bits, NEED_GW=ctx.need_gw, BLOCK=_BLOCK,
                   num_warps=_NUM_WARPS)
        gw = None
        if ctx.need_gw:
            gw = (gw_part.sum(0) if n else torch.zeros(K, device=gy.device)).to(w.dtype)
        if not n:
            gxs = [torch.zeros_like(gy) if g is not None else None for g in gxs]
        return (gw, *gxs)


# --------------------------------------------------------------------------- #
# PyTorch reference
# --------------------------------------------------------------------------- #
class _MixedOpSumReference(torch.autograd.Function):
    """Reference autograd: the same zero-skip in the forward, full gradients in the backward."""

    @staticmethod
    def forward(ctx, weights: Tensor, *outputs: Tensor) -> Tensor:
        w_host = weights.detach().float().tolist()       # one device sync; it is the reference
        acc = None
        for w_k, o_k in zip(w_host, outputs):
            if w_k == 0.0:
                continue                                  # exactly-zero weight: not read
            term = o_k.float() * w_k
            acc = term if acc is None else acc.add_(term)
        if acc is None:
            acc = torch.zeros(outputs[0].shape, dtype=torch.float32, device=outputs[0].device)
        ctx.need_gw = bool(ctx.needs_input_grad[0])
        ctx.save_for_backward(weights, *(outputs if ctx.need_gw else ()))
        return acc.to(outputs[0].dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        weights, *outputs = ctx.saved_tensors
        g32 = gy.float()
        gxs = [(g32 * weights[k].float()).to(gy.dtype) if need else None
               for k, need in enumerate(ctx.needs_input_grad[1:])]
        gw = None
        if ctx.need_gw:
            gw = torch.stack([(g32 * o.float()).sum() for o in outputs]).to(weights.dtype)
        return (gw, *gxs)


def mixed_op_sum_reference(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """PyTorch reference of :func:`mixed_op_sum` (same arguments, same semantics)."""
    outputs = _validate(outputs, weights)
    return _MixedOpSumReference.apply(weights, *outputs)


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def _validate(outputs: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    outputs = list(outputs)
    if not outputs:
        raise ValueError("mixed_op_sum: needs at least one output tensor")
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.numel() != len(outputs):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"mixed_op_sum: weights must be a 1-D tensor of length K = "
                         f"{len(outputs)} (one per output), got {shape}")
    if not weights.is_floating_point():
        raise ValueError(f"mixed_op_sum: weights must be floating point, got {weights.dtype}")
    first = outputs[0]
    for k, o in enumerate(outputs):
        if not o.is_floating_point():
            raise ValueError(f"mixed_op_sum: outputs must be floating point; output {k} is {o.dtype}")
        if o.shape != first.shape or o.device != first.device:
            raise ValueError(
                f"mixed_op_sum: all outputs must share shape and device; output {k} is "
                f"{tuple(o.shape)} on {o.device}, output 0 is {tuple(first.shape)} on {first.device}")
    if weights.device != first.device:
        raise ValueError(f"mixed_op_sum: weights are on {weights.device}, "
                         f"outputs on {first.device}")
    dtype = functools.reduce(torch.promote_types, (o.dtype for o in outputs))
    return [o.to(dtype) for o in outputs]


def mixed_op_sum(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Weighted sum of same-shaped op outputs: ``sum_k weights[k] * outputs[k]``.

    Args:
        outputs: K floating-point tensors of one shape and device (any shape, e.g.
            ``[B, C, H, W]``). Mixed dtypes (under autocast some ops stay float32) are promoted
            to the widest (``torch.promote_types``) before the sum.
        weights: ``[K]`` floating-point weights on the same device (e.g. Dyn-EGS
            straight-through weights).

    Returns:
        A tensor of the outputs' shape and (promoted) dtype (float32 accumulation).

    Outputs whose weight is exactly zero (``0.0`` or ``-0.0``) are not read in the forward, so
    a NaN or inf in a switched-off op does not reach the sum. The backward reads all outputs:
    ``dL/dweights[k] = <dL/dh, outputs[k]>`` for every k (the straight-through gradient reaches
    the ops that were switched off) and ``dL/doutputs[k] = weights[k] * dL/dh``.
    float64 outputs take the reference on every backend.
    """
    outputs = _validate(outputs, weights)
    if resolve("mixed_op_sum", weights, *outputs, unsupported=unsupported_dtype(outputs[0])) == "triton":
        return MixedOpSumFunction.apply(weights, *outputs)
    return _MixedOpSumReference.apply(weights, *outputs)
