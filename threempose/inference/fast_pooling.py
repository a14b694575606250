"""Faster CPU forms of stride-1 pooling for the deploy form (part of step 3 of
:func:`~threempose.inference.deploy.optimize_for_inference`).

The fabric's ``max_pool`` and ``avg_pool`` ops are 3 x 3, stride-1 pools, and PyTorch's CPU
kernels run them slowly: ``max_pool2d`` always computes the argmax indices as well (an int64
per output, four times the bytes of a bf16 output) and ``avg_pool2d`` gains nothing from
bf16. Measured at ``[1, 32, 128, 128]`` channels-last, one thread, on an EPYC with
``avx512_bf16`` (microseconds, bf16 / float32):

==============================  =============  ==================================================
pool                            PyTorch        here
==============================  =============  ==================================================
max 3 x 3                       1205 / 880     394 / 324: the max of ``k`` shifted views along
                                               W, then along H (:class:`SeparableMaxPool`)
avg 3 x 3, padding not counted  477 / 511      ~180 / ~130: a oneDNN depthwise conv of ones
                                               times ``1 / count`` (:class:`ConvAvgPool`)
==============================  =============  ==================================================

Max pooling gives the same numbers (a max is exact); average pooling the same up to float
rounding (the window sum is taken in another order, and in bf16 rounded before the division).
:func:`speed_up_pools` swaps the instances in place to subclasses of their classes
(``isinstance`` holds, so op costs and names stay).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threempose.inference.onednn_fusion import subclass_with


def _stride1_geometry(pool: nn.Module) -> Optional[tuple[int, int]]:
    """``(k, p)`` of a square ``k x k`` pool with stride 1, padding ``p <= k // 2``, no dilation
    and no ceil mode (output size = input size when ``p = k // 2``); None for any other pool."""
    def single(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v[0] if v[0] == v[1] else None

    k, p, s = single(pool.kernel_size), single(pool.padding), single(pool.stride or pool.kernel_size)
    if None in (k, p, s) or s != 1 or p > k // 2 or pool.ceil_mode:
        return None
    if isinstance(pool, nn.MaxPool2d) and (single(pool.dilation) != 1 or pool.return_indices):
        return None
    if isinstance(pool, nn.AvgPool2d) and pool.divisor_override is not None:
        return None
    return k, p


def _max_of_shifts(x: Tensor, dim: int, k: int) -> Tensor:
    """``out[..., i, ...] = max_j x[..., i + j, ...]`` over ``j < k`` along ``dim`` (size ``n - k + 1``)."""
    n = x.shape[dim] - k + 1
    out = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, 1, n))
    for j in range(2, k):
        torch.maximum(out, x.narrow(dim, j, n), out=out)
    return out


class _SeparableMaxPool:
    """``k x k`` stride-1 max pool as a max of shifted views, along W then H."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H + 2p - k + 1, W + 2p - k + 1]``, the layout of ``x``."""
        k, p = self.geometry
        if p:
            x = F.pad(x, (p, p, p, p), value=float("-inf"))   # what max_pool2d pads with
        return _max_of_shifts(_max_of_shifts(x, 3, k), 2, k)


class _ConvAvgPool:
    """``k x k`` stride-1 average pool as a oneDNN depthwise convolution of ones (the window sums,
    weight pre-packed) times ``1 / count`` per output pixel (``k * k``, or at the border the
    number of real pixels in the window when the padding is not counted)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H + 2p - k + 1, W + 2p - k + 1]`` (C as packed)."""
        k, p = self.geometry
        sums = torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_ones, None, [p, p], [1, 1], [1, 1], self.channels, "none", [], "")
        return sums.mul_(self._inverse_counts(x.shape[-2:], x.dtype))

    def _inverse_counts(self, size: torch.Size, dtype: torch.dtype) -> Tensor:
        """``[1, 1, H', W']``: ``1 / count`` of each output's window, in ``dtype`` (a float32 factor
        would make the in-place product take a slow mixed-dtype path; cached per size)."""
        key = (*size, dtype)
        if key not in self.inverse_counts:
            k, p = self.geometry
            real = F.avg_pool2d(torch.ones(1, 1, *size), k, 1, p, count_include_pad=True)  # real pixels / k^2
            inverse = torch.full_like(real, 1 / (k * k)) if self.count_include_pad else (real * (k * k)).reciprocal()
            self.inverse_counts[key] = inverse.to(dtype)
        return self.inverse_counts[key]

    def pack(self) -> None:
        """Pack the ``[C, 1, k, k]`` ones in oneDNN's layout for ``pack_shape``."""
        k, p = self.geometry
        ones = torch.ones(self.channels, 1, k, k, dtype=self.sum_dtype)
        self.packed_ones = torch._C._nn.mkldnn_reorder_conv2d_weight(
            ones.to_mkldnn(), [p, p], [1, 1], [1, 1], self.channels, self.pack_shape)

    def __getstate__(self) -> dict:
        # the packed weight is an opaque oneDNN tensor (deepcopy cannot copy it): copies pack again
        return {k: v for k, v in super().__getstate__().items() if k != "packed_ones"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.pack()


def speed_up_pools(net: nn.Module, input_shapes: dict[nn.Module, tuple[int, ...]],
                   dtype: Optional[torch.dtype] = None) -> None:
    """Swap every square stride-1 ``nn.MaxPool2d`` / ``nn.AvgPool2d`` of ``net`` that ran with an
    input shape in ``input_shapes`` (``[B, C, H, W]``) to the forms above, in place. The average
    pools' convolutions are packed for that shape and ``dtype`` (None: float32), so the pools
    take inputs of that precision (and any H, W); inference on the CPU only."""
    for m in net.modules():
        geometry = _stride1_geometry(m) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) else None
        if geometry is None or m not in input_shapes:
            continue
        m.geometry = geometry
        if isinstance(m, nn.MaxPool2d):
            m.__class__ = subclass_with(_SeparableMaxPool, type(m), "Separable")
        else:
            m.__class__ = subclass_with(_ConvAvgPool, type(m), "Conv")
            m.channels = int(input_shapes[m][1])
            m.pack_shape = [int(v) for v in input_shapes[m]]
            m.sum_dtype = dtype or torch.float32
            m.inverse_counts = {}
            m.pack()
