"""oneDNN fusion for the CPU deploy form (step 3 of :func:`~threempose.inference.deploy.optimize_for_inference`).

Every convolution runs as one ``mkldnn._convolution_pointwise`` call with its weight pre-packed
once into oneDNN's blocked layout (:class:`PackedConv2d`, :func:`pack_conv`), a ReLU that follows
it in an ``nn.Sequential`` fused into it, and in the residual units (:class:`BasicBlock`,
:class:`Bottleneck`) the shortcut add and the final ReLU fused into the last convolution
(:func:`fuse_onednn`). Fused modules are subclasses of the originals (:func:`subclass_with`):
``isinstance`` holds and parameters keep their names. Inference on the CPU only.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from threempose.models.hrnet_blocks import BasicBlock, Bottleneck

class PackedConv2d(nn.Conv2d):
    """A Conv2d run by oneDNN with a pre-packed weight, optionally with ReLU fused
    (``activation``) and, through :meth:`forward_add`, a residual add. Made from a Conv2d by
    :func:`pack_conv` (the instance keeps its parameters). Inference only (no autograd)."""

    activation: str
    packed_weight: Tensor
    pack_shape: list[int]

    def repack(self) -> None:
        """(Re)pack ``self.weight`` into oneDNN's layout for inputs of ``self.pack_shape``."""
        self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups, self.pack_shape)

    def __getstate__(self) -> dict:
        # the packed weight is an opaque oneDNN tensor: copies and pickles repack from the weight
        return {k: v for k, v in super().__getstate__().items() if k != "packed_weight"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.repack()

    def forward(self, x: Tensor) -> Tensor:
        """``act(conv(x))``: ``[B, Cin, H, W] -> [B, Cout, H', W']``."""
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            self.activation, [], "")

    def forward_add(self, x: Tensor, other: Tensor, relu: bool) -> Tensor:
        """``conv(x) + other``, then ReLU if ``relu`` (``other`` ``[B, Cout, H', W']``)."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.packed_weight, self.bias, self.padding, self.stride, self.dilation,
            self.groups, "add", None, "relu" if relu else None, [], "")


def pack_conv(conv: nn.Conv2d, input_shape: Iterable[int]) -> PackedConv2d:
    """Turn ``conv`` (float32, CPU, zero padding) into a :class:`PackedConv2d` in place, its weight
    packed for inputs of ``input_shape`` ``[B, Cin, H, W]`` (other shapes work, maybe slower)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"pack_conv: zero padding given as numbers needed, got {conv.padding!r} "
                         f"({conv.padding_mode})")
    conv.__class__ = PackedConv2d
    conv.activation = "none"
    conv.pack_shape = [int(v) for v in input_shape]
    conv.repack()
    return conv


class _FusedBasicBlock:
    """BasicBlock forward on packed convs: ``conv2(conv1(x) [relu]) + shortcut [relu]`` (folded BNs)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2.forward_add(self.conv1(x), shortcut, relu=True)


class _FusedBottleneck:
    """Bottleneck forward on packed convs: ``conv3(conv2(conv1(x))) + shortcut [relu]`` (folded BNs)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3.forward_add(self.conv2(self.conv1(x)), shortcut, relu=True)


_FUSED_BLOCKS = {BasicBlock: (_FusedBasicBlock, ("conv1",), "conv2"),
                 Bottleneck: (_FusedBottleneck, ("conv1", "conv2"), "conv3")}
_subclasses: dict[tuple[type, type], type] = {}


def subclass_with(mixin: type, cls: type, prefix: str) -> type:
    """``class <prefix><cls name>(mixin, cls)`` (cached): ``cls`` with ``mixin``'s forward, e.g.
    ``FusedBasicBlock``; an instance swapped to it (``m.__class__ = ...``) keeps ``isinstance(m, cls)``."""
    if (mixin, cls) not in _subclasses:
        _subclasses[mixin, cls] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
    return _subclasses[mixin, cls]


def fuse_onednn(net: nn.Module, input_shapes: dict[nn.Module, tuple[int, ...]]) -> None:
    """Pack every traced Conv2d (:func:`pack_conv`), fuse ReLUs that follow a conv in an
    ``nn.Sequential`` (only identities between) and the residual units' add + ReLU, in place.
    BatchNorms must be folded already."""
    for conv, shape in input_shapes.items():
        if type(conv) is nn.Conv2d:
            pack_conv(conv, shape)
    for m in list(net.modules()):
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for i, (_, child) in enumerate(children):
                if not isinstance(child, PackedConv2d) or child.activation != "none":
                    continue
                j = i + 1
                while j < len(children) and type(children[j][1]) is nn.Identity:
                    j += 1
                if j < len(children) and type(children[j][1]) is nn.ReLU:
                    child.activation = "relu"
                    setattr(m, children[j][0], nn.Identity())
        for base, (mixin, relu_convs, last) in _FUSED_BLOCKS.items():
            # only blocks that run the base class' forward, with folded BNs and packed convs
            if (isinstance(m, base) and type(m).forward is base.forward
                    and all(type(getattr(m, f"bn{k}")) is nn.Identity for k in range(1, len(relu_convs) + 2))
                    and all(isinstance(getattr(m, c), PackedConv2d) for c in (*relu_convs, last))):
                for c in relu_convs:
                    getattr(m, c).activation = "relu"
                m.__class__ = subclass_with(mixin, type(m), "Fused")
