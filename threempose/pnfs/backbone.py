"""Backbones that turn a person crop into the feature pyramid the part subnetworks share.

Both return ``R`` rows, row ``r`` ``[B, widths[r], ceil(H / 2**(r+2)), ceil(W / 2**(r+2))]``
for a ``[B, 3, H, W]`` crop (1/4 .. 1/32 of the crop for ``R = 4``):

* :class:`HRNetBackbone` — HRNet's stem .. stage 3 and the transition that opens the 1/32
  branch (PNFS Tables VI, VII: "HRNet-W32-Stem~stage3", 8.1 M parameters for W32: measured
  8,128,320). The blocks are HigherHRNet's own (:class:`threempose.models.higherhrnet.HigherHRNet`,
  the teacher), with the official key names, so HRNet / HigherHRNet checkpoints load into it
  (:meth:`HRNetBackbone.load_pretrained`). Widths ``W, 2W, 4W, 8W``.
* :class:`MobileNetV2Backbone` — MobileNet-V2 (Sandler et al. 2018) through its 160-channel
  blocks (PNFS Tables II-V, VII: "MobileNet-V2 (1.3M)"; measured 1,337,792), with
  torchvision's ``mobilenet_v2`` key names, so an ImageNet ``mobilenet_v2`` state_dict loads
  into it (:meth:`MobileNetV2Backbone.load_pretrained`). Widths ``24, 32, 96, 160``.
* :class:`ResNet50Backbone` — ResNet-50 (He et al. 2016) stem .. ``layer4`` (PNFS Table VII
  "ours-2": "ResNet-50 (23.5M)"; measured 23,508,032), with torchvision's ``resnet50`` key
  names, so an ImageNet ``resnet50`` state_dict loads into it (:meth:`ResNet50Backbone.load_pretrained`;
  its ``fc`` is ignored). Widths ``256, 512, 1024, 2048`` (the outputs of ``layer1`` .. ``layer4``).
* :class:`FabricBackbone` — a fabric backbone (PNFS §III-C, Fig. 5, Table VIII): the fabric
  stem (two stride-2 3x3 convs, optional bottlenecks, a 1x1 conv to ``C``) and the first ``m``
  layers of a cell fabric, searchable (its own architecture parameters) or fixed. Widths
  ``C * 2**r``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import Tensor, nn

from threempose.engine.checkpoint import check_state_dict, read_torch_file
from threempose.models.higherhrnet import HigherHRNet, unwrap_state_dict
from threempose.models.hrnet_blocks import apply_transition
from threempose.nas.stem import Stem
from threempose.pnfs.cnf import FixedFabric, SearchableFabric


class HRNetBackbone(nn.Module):
    """HRNet stem .. stage 3 + transition 3: ``[B, 3, H, W]`` -> 4 rows of widths ``W * 2**r``.

    Args:
        width: HRNet width ``W`` (32 for HRNet-W32).

    ``H`` and ``W`` must be multiples of 16 (stage 3's exchange units upsample by exact powers
    of two); PNFS' 384 x 288 and 256 x 192 crops are.
    """

    MULTIPLE = 16
    KEYS = ("conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2", "transition2", "stage3",
            "transition3")

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        full = HigherHRNet(width=width)
        for name in self.KEYS:
            setattr(self, name, getattr(full, name))
        self.relu = full.relu
        self.widths = [width * 2 ** r for r in range(4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2] % self.MULTIPLE or x.shape[-1] % self.MULTIPLE:
            raise ValueError(f"HRNetBackbone needs crops [B, 3, H, W] with H and W multiples of "
                             f"{self.MULTIPLE}, got {list(x.shape)}")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = self.stage2(apply_transition(self.transition1, [self.layer1(x)]))
        ys = self.stage3(apply_transition(self.transition2, ys))
        return apply_transition(self.transition3, ys)

    def load_pretrained(self, path: Union[str, Path]) -> None:
        """Load the stem .. stage-3 and transition-3 weights from an HRNet or HigherHRNet
        checkpoint (e.g. ImageNet-pretrained HRNet-W32, or ``pose_higher_hrnet_w32_512.pth``);
        its other entries (stage 4, heads, classifier) are ignored. Errors: :func:`load_backbone_weights`."""
        load_backbone_weights(self, path, "HRNet stem..stage 3")


def load_backbone_weights(backbone: nn.Module, path: Union[str, Path], what: str) -> None:
    """Load the entries of the checkpoint at ``path`` whose keys ``backbone`` has (a classifier's
    or a later stage's are ignored); every key of ``backbone`` must be there, with its shape.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, no state_dict inside, or a backbone key missing / of
            another shape (:class:`~threempose.engine.checkpoint.StateDictMismatchError`,
            naming ``what``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path} (pnfs.backbone_checkpoint)")
    obj = read_torch_file(path, "cpu", "a backbone weights file",
                          "re-save just its state_dict with torch.save(model.state_dict(), ...)")
    state = unwrap_state_dict(obj, str(path))
    ours = backbone.state_dict()
    subset = {k: v for k, v in state.items() if k in ours}
    check_state_dict(backbone, subset, f"{path} ({what})")
    backbone.load_state_dict(subset)


class _ConvBNReLU6(nn.Sequential):
    """``k x k`` conv (no bias, padding ``k // 2``) - BN - ReLU6: torchvision's ``Conv2dNormActivation``
    layout (keys ``0.weight``, ``1.*``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    """MobileNet-V2's bottleneck: [1x1 expand x t - BN - ReLU6] - 3x3 depthwise (stride s) - BN - ReLU6
    - 1x1 linear projection - BN, plus the input when the stride is 1 and the width is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers = [_ConvBNReLU6(in_ch, hidden, 1)] if expand != 1 else []
        layers += [_ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Backbone(nn.Module):
    """MobileNet-V2 (width 1.0) up to its 160-channel blocks: ``[B, 3, H, W]`` -> 4 rows of widths
    ``24, 32, 96, 160`` at ``ceil(H / 2**(r+2))``, the outputs of ``features[3]``, ``[6]``,
    ``[13]`` and ``[16]`` (the last block of each stride). The 320-channel block, the 1280-wide
    1x1 conv and the classifier are left out, as PNFS' 1.3 M parameters imply.
    """

    # (expansion t, width c, blocks n, first stride s): the paper's Table 2, 320-channel row left out
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
    TAPS = (3, 6, 13, 16)          # features[i] whose outputs are pyramid rows 0..3

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_ConvBNReLU6(3, 32, 3, 2)]
        width = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(_InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        self.features = nn.Sequential(*blocks)
        self.widths = [24, 32, 96, 160]

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileNetV2Backbone needs crops [B, 3, H, W], got {list(x.shape)}")
        rows = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.TAPS:
                rows.append(x)
        return rows

    def load_pretrained(self, path: Union[str, Path]) -> None:
        """Load ``features.0`` .. ``features.16`` from a torchvision ``mobilenet_v2`` state_dict
        (e.g. its ImageNet weights saved with ``torch.save(model.state_dict(), path)``); the
        other entries (``features.17``, ``features.18``, ``classifier``) are ignored. Errors:
        :func:`load_backbone_weights`."""
        load_backbone_weights(self, path, "torchvision mobilenet_v2 features 0..16")


class _Bottleneck(nn.Module):
    """ResNet's bottleneck (torchvision v1.5 layout: the stride on the 3x3): 1x1 ``in -> w`` - BN -
    ReLU - 3x3 ``w -> w`` (stride s) - BN - ReLU - 1x1 ``w -> 4w`` - BN, plus the input (through a
    1x1 stride-s conv-BN ``downsample`` when the shape changes), ReLU."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = 4 * width
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
                           if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Backbone(nn.Module):
    """ResNet-50 stem (7x7 stride-2 conv - BN - ReLU - 3x3 stride-2 max pool) and ``layer1`` ..
    ``layer4`` (3, 4, 6, 3 bottlenecks): ``[B, 3, H, W]`` -> 4 rows of widths ``256, 512, 1024,
    2048`` at ``ceil``-ish ``H / 2**(r+2)`` (PyTorch's conv / pool arithmetic; exact for ``H``,
    ``W`` multiples of 32). No ``avgpool`` / ``fc``: PNFS' 23.5 M is the stem-to-``layer4`` count.
    """

    BLOCKS = (3, 4, 6, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, blocks in enumerate(self.BLOCKS):
            width = 64 * 2 ** i
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(in_ch, width, 2 if (b == 0 and i > 0) else 1))
                in_ch = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.widths = [256, 512, 1024, 2048]

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet50Backbone needs crops [B, 3, H, W], got {list(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        rows = []
        for i in range(len(self.BLOCKS)):
            x = getattr(self, f"layer{i + 1}")(x)
            rows.append(x)
        return rows

    def load_pretrained(self, path: Union[str, Path]) -> None:
        """Load ``conv1`` .. ``layer4`` from a torchvision ``resnet50`` state_dict (e.g. its ImageNet
        weights, ``resnet50-19c8e357.pth`` / ``resnet50-0676ba61.pth``); ``fc`` is ignored. Errors:
        :func:`load_backbone_weights`."""
        load_backbone_weights(self, path, "torchvision resnet50 conv1..layer4")


class FabricBackbone(nn.Module):
    """The fabric stem and the first ``layers`` layers of a cell fabric (PNFS §III-C).

    Args:
        fabric: a ``"backbone"`` :class:`SearchableFabric` (the search) or a :class:`FixedFabric`
            of a backbone architecture.
        stem_blocks: bottleneck units in the stem (0: PNFS' "two-layer convolutional stem").

    ``forward(x, tau, seed)``: ``[B, 3, H, W]`` -> rows ``[B, C * 2**r, ceil(H / 2**(r+2)), ...]``.
    """

    def __init__(self, fabric: Union[SearchableFabric, FixedFabric], stem_blocks: int = 0) -> None:
        super().__init__()
        g = fabric.genotype
        self.stem = Stem(g.channels, stem_blocks)
        self.fabric = fabric
        self.widths = [g.channels * 2 ** r for r in range(g.rows)]

    def forward(self, x: Tensor, tau: float = 1.0, seed: Optional[int] = None) -> list[Tensor]:
        rows = self.fabric({0: self.stem(x)}, tau, seed)
        return [rows[r] for r in range(len(self.widths))]
