"""Exits: Fuse-Split blocks and prediction heads (thesis §3.1.2-3.1.3, Fig. 3.2).

At an early-escape layer (EEL) the fabric's rows ``x_r`` (``[B, C*2**r, h_r, w_r]``) are fused
into one 1/4-scale feature ``F`` (``[B, C, h_0, w_0]``) that feeds a head, the next Fuse and
the Split::

    F1  = SE(conv1x1-BN-ReLU(concat_r up(conv1x1-BN-ReLU(x_r)))))    rows -> C  ("4C wide" for 4 rows)
    F   = SE(conv1x1-BN-ReLU(concat(conv1x1-BN-ReLU(F1), conv1x1-BN-ReLU(S))))   with the previous
                                                                      EEL's F as skip S (none at the first)
    x_r <- x_r + BN(conv1x1 stride 2**r(F))                          Split: back to every row

``up`` is a bilinear resize to row 0's size. The final layer fuses the same way (so the last
output sees every row) but has no Split. A :class:`Head` turns ``F`` into ``J`` heatmaps and
``J`` associative-embedding tags at 1/4 scale. With ``fuse_split`` off (the thesis' ablation),
heads read row 0 directly and nothing is fused or sent back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threempose.nas.cost import convs_macs
from threempose.nas.ops import SqueezeExcite, conv_bn


@dataclass
class ExitOutput:
    """One exit's predictions: ``heatmaps`` and ``tags`` are ``[B, J, ceil(H/4), ceil(W/4)]``
    for a ``[B, 3, H, W]`` image; ``layer`` is the fabric layer the exit reads."""

    layer: int
    heatmaps: Tensor
    tags: Tensor


class Fuse(nn.Module):
    """Inputs of widths ``in_channels`` -> per input conv1x1-BN-ReLU to ``C`` and a bilinear resize
    to ``size``, concat (``len(in_channels) * C``), conv1x1-BN-ReLU to ``C``, squeeze-excite.

    ``forward(xs, size)``: ``xs[i]`` is ``[B, in_channels[i], h_i, w_i]`` -> ``[B, C, *size]``.
    ``macs(h, w)`` assumes input ``i`` of an ``h x w`` output is at ``ceil(h / 2**scales[i])``.
    """

    def __init__(self, in_channels: Sequence[int], scales: Sequence[int], channels: int) -> None:
        super().__init__()
        self.scales = list(scales)
        self.reduce = nn.ModuleList(conv_bn(c, channels, 1) for c in in_channels)
        self.merge = conv_bn(len(in_channels) * channels, channels, 1)
        self.se = SqueezeExcite(channels)

    def forward(self, xs: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        ys = []
        for reduce, x in zip(self.reduce, xs):
            y = reduce(x)
            if tuple(y.shape[-2:]) != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            ys.append(y)
        return self.se(self.merge(torch.cat(ys, dim=1)))

    def macs(self, h: int, w: int) -> int:
        return (sum(convs_macs(r, -(-h // 2 ** s), -(-w // 2 ** s)) for r, s in zip(self.reduce, self.scales))
                + convs_macs(self.merge, h, w) + self.se.macs(h, w))


class Split(nn.Module):
    """Sends ``F`` back to the rows: ``x_r + BN(conv1x1 stride 2**r (F))`` (``C -> C * 2**r``)."""

    def __init__(self, rows: Sequence[int], channels: int) -> None:
        super().__init__()
        self.rows = list(rows)
        self.proj = nn.ModuleDict(
            {str(r): conv_bn(channels, channels * 2 ** r, 1, stride=2 ** r, relu=False) for r in self.rows})

    def forward(self, fused: Tensor, feats: Mapping[int, Tensor]) -> dict[int, Tensor]:
        """``fused`` ``[B, C, h_0, w_0]``, ``feats[r]`` ``[B, C*2**r, h_r, w_r]`` -> the new ``feats``."""
        return {r: feats[r] + self.proj[str(r)](fused) for r in self.rows}

    def macs(self, h: int, w: int) -> int:
        """Multiply-adds for ``F`` of size ``h x w``."""
        return convs_macs(self, h, w)


class FuseSplit(nn.Module):
    """The Fuse block (and, at an EEL, the Split) of one exit layer.

    Args:
        rows: the rows of the layer that are fused (each row's stream is read).
        channels: ``C`` (row ``r`` is ``C * 2**r`` wide).
        skip: whether a previous EEL's ``F`` is fused in too (``fuse_skip``).
        split: whether ``F`` is sent back to the rows (``split``; EELs, not the final layer).
    """

    def __init__(self, rows: Sequence[int], channels: int, skip: bool, split: bool) -> None:
        super().__init__()
        self.rows = list(rows)
        self.fuse = Fuse([channels * 2 ** r for r in self.rows], self.rows, channels)
        self.fuse_skip = Fuse([channels, channels], [0, 0], channels) if skip else None
        self.split = Split(self.rows, channels) if split else None

    def forward(self, feats: Mapping[int, Tensor], skip: Optional[Tensor], size: tuple[int, int]) -> Tensor:
        """Fuse rows ``feats[r]`` (and ``skip``, ``[B, C, *size]``) into ``F``: ``[B, C, *size]``."""
        fused = self.fuse([feats[r] for r in self.rows], size)
        if self.fuse_skip is not None:
            if skip is None:
                raise ValueError("this Fuse block fuses a previous exit's features; skip is None")
            fused = self.fuse_skip([fused, skip], size)
        return fused


class Head(nn.Module):
    """1x1 conv (with bias) ``C -> 2J``: ``[B, C, h, w] -> (heatmaps, tags)``, each ``[B, J, h, w]``.

    The heatmap half is initialised as HigherHRNet's final layers (weights N(0, 0.001),
    bias 0), so the first heatmaps are ~0 rather than ~0.5 everywhere. The tag half keeps
    PyTorch's default init: tags start spread out, because with all tags ~0 the push loss
    exp(-(m_i - m_j)^2) sits at a saddle (zero gradient) and grouping never starts to learn
    in a short run (measured: tag std 8e-4 after 640 steps with the small init).
    """

    def __init__(self, channels: int, num_joints: int) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.conv = nn.Conv2d(channels, 2 * num_joints, 1)
        nn.init.normal_(self.conv.weight[:num_joints].data, std=0.001)
        nn.init.zeros_(self.conv.bias[:num_joints].data)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x)
        return y[:, :self.num_joints], y[:, self.num_joints:]

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self, h, w)
