"""A fabric cell (thesis §3.2.2-3.2.3, Fig. 3.1; PNFS §III-B).

::

    I   = sum_p w_p * T_p(O_p)                    input paths p in {above, parallel, below} (Eq. 3.7)
    h_j = sum_{i<j} sum_o w_(i,j),o * o(h_i)     h_0 = I, j = 1..H          (Eq. 3.6, PNFS Eq. 1)
    out = BN(conv1x1(concat(h_1 .. h_H)))        H*C -> C

Input paths ``T_p`` bring a neighbour of the previous layer to this cell's scale and width
``C``: ``above`` (row r-1, width C/2, twice the size) is a stride-2 3x3 conv-BN-ReLU; ``parallel``
is the identity; ``below`` (row r+1, width 2C, half the size) is a 1x1 conv-BN then a bilinear
resize to this row's size. Eq. 3.6 also adds ``sum_{0<k<j} h_k`` to ``h_j``; by default that fixed
sum is left out, since "identity" is a candidate op on every edge ``h_i -> h_j`` and so the skip
is searched (``CellOptions.hidden_sum`` adds it).

One :class:`Cell` class serves both the supernet (every op on every edge, every existing path)
and a derived network (only the genotype's ops and paths). Its forward runs the ops and paths it
is told to (``CellChoice``) and combines them with
:func:`threempose.kernels.mixed_op_sum` using the given weights; with no weights
(a derived network) they are summed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threempose.config import CellOptions
from threempose.kernels import mixed_op_sum
from threempose.nas.cost import convs_macs
from threempose.nas.genotype import edge_endpoints
from threempose.nas.ops import conv_bn, make_op


class AbovePath(nn.Sequential):
    """From the higher-resolution neighbour: 3x3 stride-2 conv-BN-ReLU,
    ``[B, Cin, 2h, 2w] -> [B, C, h, w]`` (``C = 2 Cin`` in the fabric; odd sizes give ``ceil``)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(*conv_bn(in_channels, channels, 3, stride=2))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return super().forward(x)

    def macs(self, h: int, w: int) -> int:
        conv = self[0]  # its output is h x w whatever the parity of the input
        return conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * h * w


class ParallelPath(nn.Module):
    """From the same row: the identity."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        if in_channels != channels:
            raise ValueError(f"a parallel path keeps the width, got {in_channels} -> {channels}")

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return x

    def macs(self, h: int, w: int) -> int:
        return 0


class BelowPath(nn.Module):
    """From the lower-resolution neighbour: 1x1 conv-BN (``Cin -> C``, ``Cin = 2C`` in the
    fabric), then a bilinear resize to ``size``: ``[B, Cin, h', w'] -> [B, C, *size]``."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = conv_bn(in_channels, channels, 1, relu=False)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.proj(x), size=size, mode="bilinear", align_corners=False)

    def macs(self, h: int, w: int) -> int:
        # the conv runs at the lower row's size, ceil(h/2) x ceil(w/2)
        return convs_macs(self.proj, math.ceil(h / 2), math.ceil(w / 2))


PATHS = {"above": AbovePath, "parallel": ParallelPath, "below": BelowPath}


@dataclass
class CellChoice:
    """What one forward of a cell computes: a sampled sub-cell with its weights.

    ``paths``: the input names to use (their tensors are the forward's ``inputs``);
    ``path_weights``: ``[len(paths)]``. ``edges[e]``: op names to run on edge ``e``;
    ``edge_weights[e]``: ``[len(edges[e])]``.
    """

    paths: list[str]
    path_weights: Tensor
    edges: list[list[str]]
    edge_weights: list[Tensor]


class Cell(nn.Module):
    """One cell: input paths, ``H`` hidden nodes, a 1x1 output conv.

    Args:
        channels: this row's width ``C``.
        input_channels: ``{path name: width of that neighbour}`` for the paths to build.
        edges: the op names to build on each edge, in :func:`edge_endpoints` order.
        hidden: ``H``.
        name: used in error messages (e.g. ``"cell 5 (layer 3, row 0)"``).
        options: the fabric's :class:`~threempose.config.CellOptions` (ops' settings, Eq. 3.6's sum).
    """

    def __init__(self, channels: int, input_channels: Mapping[str, int],
                 edges: Sequence[Sequence[str]], hidden: int, name: str = "cell",
                 options: CellOptions = CellOptions()) -> None:
        super().__init__()
        self.name = name
        self.hidden = hidden
        self.hidden_sum = options.hidden_sum
        self.endpoints = edge_endpoints(hidden)
        if len(edges) != len(self.endpoints):
            raise ValueError(f"{name}: H = {hidden} needs {len(self.endpoints)} edges, got {len(edges)}")
        self.inputs = nn.ModuleDict({p: PATHS[p](c_in, channels) for p, c_in in input_channels.items()})
        self.edges = nn.ModuleList(nn.ModuleDict({op: make_op(op, channels, options) for op in ops})
                                   for ops in edges)
        self.output = conv_bn(hidden * channels, channels, 1, relu=False)

    def forward(self, inputs: Mapping[str, Tensor], size: tuple[int, int],
                choice: Optional[CellChoice] = None) -> Tensor:
        """Compute the cell.

        Args:
            inputs: ``{path name: neighbour output}``: ``above`` ``[B, C/2, ~2h, ~2w]``,
                ``parallel`` ``[B, C, h, w]``, ``below`` ``[B, 2C, ~h/2, ~w/2]``. Without a
                ``choice``, exactly the cell's own paths.
            size: ``(h, w)``, this row's feature size.
            choice: the sampled sub-cell and its weights (supernet); None runs every op and
                path of the cell, summed (derived network).

        Returns:
            ``[B, C, h, w]``.
        """
        if choice is None:
            if set(inputs) != set(self.inputs):
                raise ValueError(f"{self.name}: needs inputs {sorted(self.inputs)}, got {sorted(inputs)}")
            choice_paths, path_weights = list(self.inputs), None
            choice_edges, edge_weights = [list(ops) for ops in self.edges], [None] * len(self.edges)
        else:
            choice_paths, path_weights = choice.paths, choice.path_weights
            choice_edges, edge_weights = choice.edges, choice.edge_weights
        nodes = [_combine([self.inputs[p](inputs[p], size) for p in choice_paths], path_weights)]
        for (src, dst), ops, names, weights in zip(self.endpoints, self.edges, choice_edges, edge_weights):
            value = _combine([ops[o](nodes[src]) for o in names], weights)
            if dst == len(nodes):                # the first edge into h_dst: h_1 .. h_{dst-1} are done
                if self.hidden_sum and dst > 1:
                    value = value + sum(nodes[1:dst])
                nodes.append(value)
            else:
                nodes[dst] = nodes[dst] + value
        return self.output(torch.cat(nodes[1:], dim=1))

    def macs(self, h: int, w: int) -> int:
        """Multiply-adds of every path, every op and the output conv at row size ``h x w``."""
        return (sum(p.macs(h, w) for p in self.inputs.values())
                + sum(op.macs(h, w) for ops in self.edges for op in ops.values())
                + convs_macs(self.output, h, w))


def _combine(xs: list[Tensor], weights: Optional[Tensor]) -> Tensor:
    """``sum_k weights[k] * xs[k]`` through the mixed-op-sum kernel, or the plain sum."""
    if weights is not None:
        return mixed_op_sum(xs, weights)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out
