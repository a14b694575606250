"""The candidate operations of a cell edge: the nine of 3M-Pose (thesis §3.2.2) and the two
of PNFS' op set (PNFS §III-B: zero, skip, 3x3 separable conv, 3x3 dilated conv with rate 2,
3x3 avg and max pool) that 3M-Pose lacks. :data:`OPS` is the registry every other module
(genotype validation, supernets, cost and latency tables) reads.

Every op is built as ``OPS[name](channels, options)`` (``options``: the fabric's
:class:`~threempose.config.CellOptions`, which fix the SE squeeze width and how many
depthwise-pointwise pairs a separable conv has), maps ``[B, C, H, W] -> [B, C, H, W]`` (same
width and size) and has ``macs(h, w)``: multiply-adds for one ``h x w`` image (see :mod:`threempose.nas.cost`).

========== ============================================================ ===================
name       what it computes                                             multiply-adds
========== ============================================================ ===================
identity   ``x``                                                        0
conv       3x3 conv - BN - ReLU                                         9 C^2 HW
avg_pool   3x3 average pool, stride 1 (padding not counted)            0
max_pool   3x3 max pool, stride 1                                       0
residual   HRNet basic block: two 3x3 conv-BN, identity shortcut, ReLU 18 C^2 HW
sep_conv   depthwise 3x3 - BN - ReLU - pointwise 1x1 - BN - ReLU        (9 C + C^2) HW
           (``sep_conv_repeats`` times; 1 by default)
csi        conv-sigmoid * identity: ``x * sigmoid(BN(conv1x1(x)))``    C^2 HW
zoom_conv  FasterSeg's zoomed conv: bilinear resize to ceil(H/2) x       9 C^2 ceil(H/2) ceil(W/2)
           ceil(W/2), 3x3 conv - BN, bilinear resize back, ReLU
se         squeeze-and-excite: ``x * sigmoid(W2 relu(W1 mean_hw(x)))``  2 C (C/r), r =
                                                                        ``se_reduction`` (4)
zero       ``0`` (PNFS): the edge contributes nothing                  0
dil_conv   PNFS' 3x3 dilated conv, rate 2, separable as DARTS'         (9 C + C^2) HW
           ``dil_conv_3x3``: depthwise 3x3 dilation 2 - BN - ReLU -
           pointwise 1x1 - BN - ReLU
========== ============================================================ ===================

Usage::

    op = make_op("zoom_conv", 64)
    y = op(x)                      # x: [B, 64, H, W] -> y: [B, 64, H, W]
    op.macs(H, W)                  # == FlopCounterMode count / 2 for one image
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threempose.config import CellOptions
from threempose.models.hrnet_blocks import BasicBlock
from threempose.nas.cost import conv_macs, convs_macs

DEFAULT_OPTIONS = CellOptions()


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            relu: bool = True, dilation: int = 1) -> nn.Sequential:
    """``kernel x kernel`` conv (padding ``dilation * (kernel // 2)``: same size at stride 1;
    no bias) - BN [- ReLU]."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=dilation * (kernel // 2),
                        dilation=dilation, groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Identity(nn.Identity):
    """``x -> x``. Costs nothing."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()

    def macs(self, h: int, w: int) -> int:
        return 0


class Conv(nn.Sequential):
    """3x3 conv - BN - ReLU, ``C -> C``."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(*conv_bn(channels, channels, 3))

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self, h, w)


class AvgPool(nn.AvgPool2d):
    """3x3 average pool, stride 1, padding 1 (border averages exclude the padding)."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(3, stride=1, padding=1, count_include_pad=False)

    def macs(self, h: int, w: int) -> int:
        return 0


class MaxPool(nn.MaxPool2d):
    """3x3 max pool, stride 1, padding 1."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(3, stride=1, padding=1)

    def macs(self, h: int, w: int) -> int:
        return 0


class Residual(BasicBlock):
    """HRNet's basic residual block, ``relu(x + BN(conv3x3(relu(BN(conv3x3(x))))))``."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(channels, channels)

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self, h, w)


def separable_pairs(channels: int, repeats: int, dilation: int = 1) -> list[nn.Module]:
    """``repeats`` x (depthwise 3x3 (``dilation``) - BN - ReLU - pointwise 1x1 - BN - ReLU), ``C -> C``."""
    return [layer for _ in range(repeats)
            for layer in (*conv_bn(channels, channels, 3, groups=channels, dilation=dilation),
                          *conv_bn(channels, channels, 1))]


class SepConv(nn.Sequential):
    """Depthwise-separable conv: depthwise 3x3 - BN - ReLU - pointwise 1x1 - BN - ReLU, that pair
    ``options.sep_conv_repeats`` times (the thesis names one "Depth Wise Separable Convolution";
    DARTS' ``sep_conv_3x3`` stacks two)."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(*separable_pairs(channels, options.sep_conv_repeats))

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self, h, w)


class CSI(nn.Module):
    """Conv-Sigmoid * Identity: a per-pixel, per-channel gate ``x * sigmoid(BN(conv1x1(x)))``.

    The thesis gives every other convolutional op a kernel size ("Conv (3x3)", "Zoom
    Convolution (3x3)", ...) and this one none; a pointwise gate is also what makes the
    thesis' own Table A.1 architecture cost what its Tables 4.1/4.3 report (parameters within
    5%, where a 3x3 gate gives 26% more).
    """

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        self.gate = conv_bn(channels, channels, 1, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x).sigmoid()

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self.gate, h, w)


class ZoomConv(nn.Module):
    """Zoomed conv (FasterSeg): resize ``H x W -> ceil(H/2) x ceil(W/2)`` (bilinear),
    3x3 conv - BN, resize back to ``H x W``, ReLU. A 3x3 conv's receptive field doubled
    at a quarter of its cost."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        self.conv = conv_bn(channels, channels, 3, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = F.interpolate(x, size=(-(-h // 2), -(-w // 2)), mode="bilinear",   # ceil, export-friendly
                          align_corners=False)
        y = F.interpolate(self.conv(y), size=(h, w), mode="bilinear", align_corners=False)
        return F.relu(y)

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self.conv, -(-h // 2), -(-w // 2))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite (Hu et al.): ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``,
    squeeze width ``max(1, C // options.se_reduction)`` (4 by default; the thesis gives none,
    Hu et al. use 16); the FCs are 1x1 convs with bias."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        squeeze = max(1, channels // options.se_reduction)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.fc2(F.relu(self.fc1(s))).sigmoid()

    def macs(self, h: int, w: int) -> int:
        return conv_macs(self.fc1, 1, 1) + conv_macs(self.fc2, 1, 1)


class Zero(nn.Module):
    """``x -> 0`` (PNFS' "zero"): under a mixed-op sum its weight takes mass from the other
    ops; it has no parameters, costs nothing and passes no gradient to ``x``."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def macs(self, h: int, w: int) -> int:
        return 0


class DilConv(nn.Sequential):
    """PNFS' "3x3 dilated convolution with 2 rate", separable as DARTS' ``dil_conv_3x3`` (whose
    op set PNFS follows): one depthwise 3x3 with dilation 2 - BN - ReLU - pointwise 1x1 - BN -
    ReLU. A 5x5 receptive field at a separable 3x3's cost."""

    def __init__(self, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> None:
        super().__init__(*separable_pairs(channels, 1, dilation=2))

    def macs(self, h: int, w: int) -> int:
        return convs_macs(self, h, w)


OPS: dict[str, Callable[[int, CellOptions], nn.Module]] = {
    "identity": Identity,
    "conv": Conv,
    "avg_pool": AvgPool,
    "max_pool": MaxPool,
    "residual": Residual,
    "sep_conv": SepConv,
    "csi": CSI,
    "zoom_conv": ZoomConv,
    "se": SqueezeExcite,
    "zero": Zero,
    "dil_conv": DilConv,
}
OP_NAMES: tuple[str, ...] = tuple(OPS)  # the genotype's op names, in alpha's column order by default


def make_op(name: str, channels: int, options: CellOptions = DEFAULT_OPTIONS) -> nn.Module:
    """Build candidate op ``name`` for ``channels``-wide features (``[B,C,H,W] -> [B,C,H,W]``)."""
    try:
        return OPS[name](channels, options)
    except KeyError:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}") from None
