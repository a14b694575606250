"""What a network costs: analytic multiply-adds of its blocks, and the expected
GFLOPs (thesis §3.4, the FLOPs constraint) or expected latency of a sampled architecture.

Convention (see :mod:`threempose.util.flops`): one multiply-add is ONE FLOP, and only
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

The same sum gives the expected *latency* (:func:`expected_latency`) when the table holds
milliseconds measured on a device (:mod:`threempose.nas.latency_table`). Both tables are
built by one routine from a :class:`BlockCosts`, which prices each block of the search space:
:class:`MacCosts` (multiply-adds) or :class:`~threempose.nas.latency_table.LatencyTable`
(milliseconds). A cell's element-wise sums (of its paths, of the ops on an edge, of the edges
into a node) cost nothing in multiply-adds but time on a device; their number is linear in
the choice (``paths + sum_e ops_e - 1 - H`` sums of ``[B, C, h, w]`` tensors), so each path
and op carries one sum's cost and the output conv ``-(1 + H)`` of them: the sum above stays
exact for a one-hot sample.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

CostUnit = Literal["gflops", "ms"]


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


class BlockCosts(ABC):
    """What each block of a fabric costs, in raw units (``raw / per_unit`` is in ``unit``).

    ``channels`` is the width of the cell's row, ``hw`` its feature size (for :meth:`block`:
    the stem's input image, or row 0's size for Fuse, Split and heads).
    """

    unit: CostUnit
    per_unit: float

    @abstractmethod
    def op(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> float:
        """Candidate op ``name`` on one edge."""
        ...

    @abstractmethod
    def path(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> float:
        """Input path ``name`` (above, parallel, below) into the cell."""
        ...

    @abstractmethod
    def output(self, module: nn.Module, hidden: int, channels: int, hw: tuple[int, int]) -> float:
        """The cell's concat -> 1x1 output conv-BN (``module`` is ``Cell.output``)."""
        ...

    @abstractmethod
    def add(self, channels: int, hw: tuple[int, int]) -> float:
        """One element-wise sum of two ``[B, channels, *hw]`` tensors."""
        ...

    @abstractmethod
    def block(self, module: nn.Module, hw: tuple[int, int]) -> float:
        """A fixed block: the stem, a Fuse, a Split or a head."""
        ...

    def cell(self, cell: nn.Module, channels: int, hw: tuple[int, int]) -> float:
        """A whole :class:`~threempose.nas.cell.Cell` with every path and op it holds, summed."""
        n_ops = sum(len(ops) for ops in cell.edges)
        return (sum(self.path(m, p, channels, hw) for p, m in cell.inputs.items())
                + sum(self.op(m, o, channels, hw) for ops in cell.edges for o, m in ops.items())
                + self.output(cell.output, cell.hidden, channels, hw)
                + (len(cell.inputs) + n_ops - 1 - cell.hidden) * self.add(channels, hw))


class MacCosts(BlockCosts):
    """Multiply-adds from each module's ``macs(h, w)`` (``raw``: MACs; ``unit``: GFLOPs)."""

    unit = "gflops"
    per_unit = 1e9

    def op(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> int:
        return module.macs(*hw)

    def path(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> int:
        return module.macs(*hw)

    def output(self, module: nn.Module, hidden: int, channels: int, hw: tuple[int, int]) -> int:
        return convs_macs(module, *hw)

    def add(self, channels: int, hw: tuple[int, int]) -> int:
        return 0

    def block(self, module: nn.Module, hw: tuple[int, int]) -> int:
        return module.macs(*hw)


@dataclass
class CostTable:
    """Per-cell costs of every candidate at one input size, in ``unit``: GFLOPs (multiply-adds
    / 1e9) or milliseconds.

    Attributes:
        ops: ``[N, K]`` cost of op ``k`` on one edge of cell ``n`` (the same on every edge).
        paths: ``[N, 3]`` cost of the input path from neighbour (above, parallel, below);
            0 where the neighbour does not exist.
        outputs: ``[N]`` cost of cell ``n``'s concat -> 1x1 output conv.
        fixed: stem + Fuse-Split blocks + heads (computed whatever is sampled).
        unit: ``"gflops"`` or ``"ms"``.
    """

    ops: Tensor
    paths: Tensor
    outputs: Tensor
    fixed: float
    unit: CostUnit = "gflops"


def expected_cost(table: CostTable, op_weights: Tensor, path_weights: Tensor, live: Tensor) -> Tensor:
    """Differentiable cost of a sampled architecture in ``table.unit`` (module docstring).

    Args:
        table: the costs at this input size.
        op_weights: ``[N, E, K]`` weight of op ``k`` on edge ``e`` of cell ``n``.
        path_weights: ``[N, 3]`` weight of each cell's input path from (above, parallel, below).
        live: ``[N]`` 1.0 for cells that are computed (their output reaches an exit), else 0.0.

    Returns:
        A 0-d tensor, the cost (GFLOPs or ms) of one forward at the table's input size.
    """
    ops = (op_weights * table.ops.unsqueeze(1)).sum(dim=(1, 2))
    paths = (path_weights * table.paths).sum(dim=1)
    return table.fixed + (live * (ops + paths + table.outputs)).sum()


def expected_gflops(table: CostTable, op_weights: Tensor, path_weights: Tensor, live: Tensor) -> Tensor:
    """:func:`expected_cost` of a multiply-add table: GFLOPs for one image."""
    _check_unit(table, "gflops")
    return expected_cost(table, op_weights, path_weights, live)


def expected_latency(table: CostTable, op_weights: Tensor, path_weights: Tensor, live: Tensor) -> Tensor:
    """:func:`expected_cost` of a latency table: milliseconds on the table's device."""
    _check_unit(table, "ms")
    return expected_cost(table, op_weights, path_weights, live)


def _check_unit(table: CostTable, unit: CostUnit) -> None:
    if table.unit != unit:
        raise ValueError(f"this cost table is in {table.unit!r}, expected {unit!r}")
