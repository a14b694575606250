"""What a network costs: analytic multiply-adds of its blocks, and the expected
GFLOPs of a sampled architecture (thesis §3.4, the FLOPs constraint).

Convention (see :mod:`threempose.flops`): one multiply-add is ONE FLOP, and only
what ``torch.utils.flop_counter.FlopCounterMode`` counts is counted, i.e.
convolutions and matrix products. Pooling, BatchNorm, activations, element-wise
products and bilinear resampling cost 0. Every block of the search space has a
``macs(h, w) -> int`` method: the multiply-adds of one image through that block
when the block's *output* is ``h x w`` (for the stem: when its input image is
``h x w``). They are written with :func:`conv_macs` from each block's own
``nn.Conv2d`` modules, so the formulas follow the modules; the tests check each
against FlopCounterMode / 2.

The supernet's cost (:func:`expected_gflops`) is a differentiable sum over the
cells that the sampled architecture computes::

    gflops = fixed + sum_cells live_c * ( sum_p w_p * path_c,p        (input paths, thesis Eq. 3.7)
                                        + sum_e,o w_e,o * op_c,o      (ops on every edge, Eq. 3.6)
                                        + out_c )                     (the cell's 1x1 output conv)

with ``w`` the sample's straight-through weights (exactly 1 for a chosen op or
path and 0 otherwise in the forward value; their backward reaches alpha, beta,
m_alpha and m_beta) and ``live_c`` 1 for a cell whose output reaches an exit.
``fixed`` is the stem, the Fuse-Split blocks and the heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


def conv_out_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Spatial output size of ``conv`` on an ``h x w`` input (PyTorch's formula)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def conv_macs(conv: nn.Conv2d, h: int, w: int) -> int:
    """Multiply-adds of ``conv`` on one ``h x w`` *input* (bias not counted, as FlopCounterMode).

    = C_out * (C_in / groups) * k_h * k_w * H_out * W_out.
    """
    ho, wo = conv_out_size(conv, h, w)
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * ho * wo


def convs_macs(module: nn.Module, h: int, w: int) -> int:
    """Sum of :func:`conv_macs` over every ``nn.Conv2d`` inside ``module``, all run on ``h x w``.

    Only valid for blocks whose convolutions all see the same input size
    (stride-1 residual stacks, 1x1 projections).
    """
    return sum(conv_macs(m, h, w) for m in module.modules() if isinstance(m, nn.Conv2d))


@dataclass
class CostTable:
    """Per-cell costs of every candidate, in GFLOPs (multiply-adds / 1e9), at one input size.

    Attributes:
        ops: ``[N, K]`` cost of op ``k`` on one edge of cell ``n`` (the same on every edge).
        paths: ``[N, 3]`` cost of the input path from neighbour (above, parallel, below);
            0 where the neighbour does not exist.
        outputs: ``[N]`` cost of cell ``n``'s concat -> 1x1 output conv.
        fixed: stem + Fuse-Split blocks + heads (computed whatever is sampled).
    """

    ops: Tensor
    paths: Tensor
    outputs: Tensor
    fixed: float


def expected_gflops(table: CostTable, op_weights: Tensor, path_weights: Tensor, live: Tensor) -> Tensor:
    """Differentiable GFLOPs of a sampled architecture (formula in the module docstring).

    Args:
        table: the costs at this input size.
        op_weights: ``[N, E, K]`` weight of op ``k`` on edge ``e`` of cell ``n``.
        path_weights: ``[N, 3]`` weight of each cell's input path from (above, parallel, below).
        live: ``[N]`` 1.0 for cells that are computed (their output reaches an exit), else 0.0.

    Returns:
        A 0-d tensor, GFLOPs (multiply-adds) for one image.
    """
    ops = (op_weights * table.ops.unsqueeze(1)).sum(dim=(1, 2))
    paths = (path_weights * table.paths).sum(dim=1)
    return table.fixed + (live * (ops + paths + table.outputs)).sum()
