"""HRNet building blocks: residual units, the multi-branch module, transitions.

These reproduce the layer structure (and therefore the ``state_dict`` key names)
of the official HRNet / HigherHRNet code, so published checkpoints load as is:

* :class:`BasicBlock` — two 3x3 conv-BN, identity (or projected) shortcut.
* :class:`Bottleneck` — 1x1 reduce, 3x3, 1x1 expand (x4), shortcut.
* :class:`HighResolutionModule` — ``n`` parallel branches (branch ``i`` at scale
  ``1/2**i`` of branch 0), each a stack of residual blocks, followed by the
  exchange ("fuse") unit: every output branch sums all input branches, brought
  to its resolution by strided 3x3 convs (higher resolution inputs) or a 1x1
  conv plus nearest upsampling (lower resolution inputs), then ReLU.
* :func:`make_transition` — the layer between two stages that adapts channel
  counts and creates the new lowest-resolution branch.

Spatial sizes: the stride-2 3x3 convs give ``ceil(h/2)`` while the fuse unit's
nearest upsampling gives exactly ``2*h``, so a module's branches only line up
when branch 0's size is divisible by ``2**(n-1)``. For the full HigherHRNet
(branch 0 at 1/4 of the input, 4 branches) that means input sides divisible
by 32; :class:`threempose.models.higherhrnet.HigherHRNet` pads to that.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

BN_MOMENTUM = 0.1


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual shortcut: [B,Cin,H,W] -> [B,C,H/s,W/s]."""

    expansion = 1

    def __init__(self, in_ch: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a residual shortcut: [B,Cin,H,W] -> [B,4C,H/s,W/s]."""

    expansion = 4

    def __init__(self, in_ch: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        out_ch = channels * self.expansion
        self.conv1 = nn.Conv2d(in_ch, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(channels, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def make_res_layer(block: type[BasicBlock] | type[Bottleneck], in_ch: int, channels: int,
                   num_blocks: int, stride: int = 1) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first projects the shortcut (1x1 conv-BN) when
    the stride or channel count changes. Output channels: ``channels * block.expansion``."""
    out_ch = channels * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
        )
    layers = [block(in_ch, channels, stride, downsample)]
    layers += [block(out_ch, channels) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel multi-resolution branches followed by a fuse (exchange) unit.

    Args:
        in_channels: channels of each input branch (branch ``i`` at scale ``1/2**i``).
        channels: block width of each branch (output channels = ``channels[i] * block.expansion``).
        num_blocks: residual blocks per branch.
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        multi_scale_output: if False, only branch 0 is produced (HRNet's last module).

    ``forward(xs)``: a list of ``n`` tensors ``[B, in_channels[i], h/2**i, w/2**i]`` ->
    a list of ``n`` (or 1) tensors ``[B, out_channels[i], h/2**i, w/2**i]``.
    The input list is not modified.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int],
                 num_blocks: Sequence[int], block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
                 multi_scale_output: bool = True) -> None:
        super().__init__()
        n = len(in_channels)
        if not (len(channels) == len(num_blocks) == n):
            raise ValueError(
                f"HighResolutionModule: in_channels ({len(in_channels)}), channels "
                f"({len(channels)}) and num_blocks ({len(num_blocks)}) must have one entry per branch")
        self.num_branches = n
        self.multi_scale_output = multi_scale_output
        self.branches = nn.ModuleList(
            make_res_layer(block, in_channels[i], channels[i], num_blocks[i]) for i in range(n))
        self.out_channels = [c * block.expansion for c in channels]
        self.fuse_layers = self._make_fuse_layers() if n > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self) -> nn.ModuleList:
        """``fuse_layers[i][j]`` maps branch ``j`` to branch ``i``'s scale and width (None if i == j)."""
        ch = self.out_channels
        n = self.num_branches
        rows = []
        for i in range(n if self.multi_scale_output else 1):
            row: list[Optional[nn.Module]] = []
            for j in range(n):
                if j > i:  # lower resolution: 1x1 conv-BN, nearest upsample by 2**(j-i)
                    row.append(nn.Sequential(
                        nn.Conv2d(ch[j], ch[i], 1, 1, 0, bias=False),
                        nn.BatchNorm2d(ch[i]),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(None)
                else:  # higher resolution: (i-j) stride-2 3x3 conv-BN, ReLU between them
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out = ch[i] if last else ch[j]
                        layers: list[nn.Module] = [nn.Conv2d(ch[j], out, 3, 2, 1, bias=False),
                                                   nn.BatchNorm2d(out)]
                        if not last:
                            layers.append(nn.ReLU(inplace=True))
                        steps.append(nn.Sequential(*layers))
                    row.append(nn.Sequential(*steps))
            rows.append(nn.ModuleList(row))
        return nn.ModuleList(rows)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_branches:
            raise ValueError(f"HighResolutionModule expects {self.num_branches} branches, got {len(xs)}")
        ys = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return ys
        fused = []
        for i, row in enumerate(self.fuse_layers):
            acc = ys[i]
            for j in range(self.num_branches):
                if j != i:
                    acc = acc + row[j](ys[j])
            fused.append(self.relu(acc))
        return fused


def make_transition(prev_channels: Sequence[int], channels: Sequence[int]) -> nn.ModuleList:
    """The layer between two HRNet stages.

    Entry ``i`` (None when branch ``i`` passes through unchanged):
    * ``i < len(prev_channels)`` and widths differ: 3x3 conv-BN-ReLU at the same scale;
    * ``i >= len(prev_channels)`` (a new branch): stride-2 3x3 conv-BN-ReLU steps from the
      previous lowest-resolution branch (the last one changes the width to ``channels[i]``).
    """
    n_prev = len(prev_channels)
    layers: list[Optional[nn.Module]] = []
    for i, c in enumerate(channels):
        if i < n_prev:
            if c != prev_channels[i]:
                layers.append(nn.Sequential(
                    nn.Conv2d(prev_channels[i], c, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            else:
                layers.append(None)
        else:
            steps = []
            c_in = prev_channels[-1]
            for k in range(i + 1 - n_prev):
                out = c if k == i - n_prev else c_in
                steps.append(nn.Sequential(
                    nn.Conv2d(c_in, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def apply_transition(transition: nn.ModuleList, ys: Sequence[Tensor]) -> list[Tensor]:
    """Run a :func:`make_transition` layer: existing branches map from the same index,
    new branches grow from the previous stage's last (lowest-resolution) output.

    (The official code feeds *every* non-None transition the last branch; that only
    differs when an existing branch changes width, which no HRNet config does.)"""
    out = []
    for i, layer in enumerate(transition):
        src = ys[i] if i < len(ys) else ys[-1]
        out.append(src if layer is None else layer(src))
    return out
