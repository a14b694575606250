"""The HRNet stem of every fabric (thesis §3.1): ``[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)]``.

Two 3x3 stride-2 conv-BN-ReLU (3 -> 64, 64 -> 64), ``blocks`` bottleneck units (-> 256) and a
1x1 conv-BN-ReLU to ``C``. It is "layer 0, row 0" of the fabric (:mod:`threempose.nas.fabric`)."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from threempose.models.hrnet_blocks import Bottleneck, make_res_layer
from threempose.nas.cost import conv_macs, conv_out_size, convs_macs
from threempose.nas.ops import conv_bn

STEM_WIDTH = 64


class Stem(nn.Module):
    """HRNet stem: ``[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)]`` (see the module docstring)."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, STEM_WIDTH, 3, stride=2)
        self.conv2 = conv_bn(STEM_WIDTH, STEM_WIDTH, 3, stride=2)
        self.blocks = (make_res_layer(Bottleneck, STEM_WIDTH, STEM_WIDTH, blocks) if blocks
                       else nn.Sequential())
        width = STEM_WIDTH * Bottleneck.expansion if blocks else STEM_WIDTH
        self.proj = conv_bn(width, channels, 1)

    def forward(self, x: Tensor, run_first_unit: Optional[Callable[[nn.Module, Tensor], Tensor]] = None) -> Tensor:
        """``run_first_unit(unit, x)`` runs the first bottleneck unit if given (activation checkpointing)."""
        x = self.conv2(self.conv1(x))
        if run_first_unit is not None and len(self.blocks):
            x = self.blocks[1:](run_first_unit(self.blocks[0], x))
            return self.proj(x)
        return self.proj(self.blocks(x))

    def macs(self, h: int, w: int) -> int:
        """Multiply-adds for one ``h x w`` image."""
        h2, w2 = conv_out_size(self.conv1[0], h, w)
        h4, w4 = conv_out_size(self.conv2[0], h2, w2)
        return (conv_macs(self.conv1[0], h, w) + conv_macs(self.conv2[0], h2, w2)
                + convs_macs(self.blocks, h4, w4) + convs_macs(self.proj, h4, w4))
