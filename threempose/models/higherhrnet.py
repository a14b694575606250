"""HigherHRNet-W32: the bottom-up pose estimator 3M-Pose uses as its teacher (thesis §3.4).

The architecture is that of the official ``pose_higher_hrnet.py`` (Cheng et al.,
CVPR 2020) with the ``w32_512`` config, layer for layer, so the published
``pose_higher_hrnet_w32_512.pth`` loads with :func:`load_weights` unchanged
(1,810 ``state_dict`` entries, 28,645,331 parameters; measured 46.2 G
multiply-adds at 512x512, which the paper reports as "47.9 GFLOPs"):

* stem: two 3x3 stride-2 conv-BN-ReLU (64 ch, 1/4 scale), ``layer1`` = 4 Bottlenecks (256 ch);
* stages 2-4 (1, 4, 3 HighResolutionModules of 4 BasicBlocks per branch), branches
  at 1/4, 1/8, 1/16, 1/32 with 32, 64, 128, 256 channels; stage 4's last module
  outputs only the 1/4 branch;
* ``final_layers[0]``: 1x1 conv -> 34 maps at 1/4 (17 heatmaps, then 17 AE tags);
* ``deconv_layers[0]``: concat(features, 1/4 output) (66 ch) -> 4x4 stride-2
  transposed conv-BN-ReLU (32 ch, 1/2 scale) -> 4 BasicBlocks;
* ``final_layers[1]``: 1x1 conv -> 17 heatmaps at 1/2.

Input sizes: the official network only runs when both input sides are multiples
of 32 (its fuse units upsample lower branches by exact powers of two). Here any
size works: other inputs are zero-padded on the bottom/right to the next multiple
of 32 and every output/feature is cropped back to ``ceil(side / stride)``. For
multiples of 32 nothing is padded and the result is the official one.

Usage::

    model = higherhrnet_w32("pose_higher_hrnet_w32_512.pth")
    heat_tags, heat_half = model(x)              # [B,34,H/4,W/4], [B,17,H/2,W/2]
    feats = model.features(x, ["stage2", "stage3", "stage4", "final"])
    teacher = load_teacher(cfg.loss.teacher)     # eval mode, frozen
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threempose.config import TeacherConfig
from threempose.engine.checkpoint import (
    CheckpointError,
    StateDictMismatchError,
    check_state_dict,
    read_torch_file,
)
from threempose.models.hrnet_blocks import (
    BN_MOMENTUM,
    BasicBlock,
    Bottleneck,
    HighResolutionModule,
    apply_transition,
    make_res_layer,
    make_transition,
)
from threempose.util.flops import count_params, model_gflops

__all__ = [
    "HigherHRNet", "higherhrnet_w32", "load_weights", "unwrap_state_dict",
    "load_teacher", "profile_higherhrnet", "CheckpointError", "StateDictMismatchError",
]

# Stage layout of HRNet (both W32 and W48): modules per stage, blocks per branch.
_STAGE_MODULES = {2: 1, 3: 4, 4: 3}
_BLOCKS_PER_BRANCH = 4


class HigherHRNet(nn.Module):
    """HigherHRNet (official layout): [B,3,H,W] -> [[B,2J,H/4,W/4], [B,J,H/2,W/2]].

    Args:
        width: channels of the 1/4 branch (32 for W32, 48 for W48); branch ``i`` has ``width * 2**i``.
        num_joints: J, keypoints per person (17 for COCO). The 1/4 output is J heatmaps
            followed by J associative-embedding tags; the 1/2 output is J heatmaps.
        deconv_blocks: BasicBlocks after the transposed conv (4 in the official config).

    Named features (see :meth:`features`, :meth:`feature_specs`), with ``s`` the stride:

    ========================  ==========================  =====
    name                      what                        s
    ========================  ==========================  =====
    ``stem``                  after ``layer1`` (256 ch)    4
    ``stage{k}.b{i}``         stage k's output branch i    4*2**i  (k=2: i<2, k=3: i<3, k=4: i=0)
    ``stage2/3/4``            alias of ``stage{k}.b0``     4
    ``final``                 1/4 output (2J ch)           4
    ``deconv``                1/2 features (width ch)      2
    ``final_half``            1/2 output (J ch)            2
    ========================  ==========================  =====
    """

    PAD_MULTIPLE = 32

    def __init__(self, width: int = 32, num_joints: int = 17, deconv_blocks: int = 4) -> None:
        super().__init__()
        self.width = width
        self.num_joints = num_joints
        self.frozen = False
        # Stem (1/4 scale).
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_res_layer(Bottleneck, 64, 64, 4)
        # Stages 2-4.
        prev = [64 * Bottleneck.expansion]
        for k in (2, 3, 4):
            channels = [width * 2 ** i for i in range(k)]
            setattr(self, f"transition{k - 1}", make_transition(prev, channels))
            modules = []
            for m in range(_STAGE_MODULES[k]):
                last_of_net = k == 4 and m == _STAGE_MODULES[k] - 1
                modules.append(HighResolutionModule(
                    channels, channels, [_BLOCKS_PER_BRANCH] * k, BasicBlock,
                    multi_scale_output=not last_of_net))
            setattr(self, f"stage{k}", nn.Sequential(*modules))
            prev = channels
        # Heads: 1/4 (heatmaps + tags), then deconv to 1/2 (heatmaps).
        self.final_layers = nn.ModuleList([
            nn.Conv2d(width, 2 * num_joints, kernel_size=1),
            nn.Conv2d(width, num_joints, kernel_size=1),
        ])
        deconv = [nn.Sequential(
            nn.ConvTranspose2d(width + 2 * num_joints, width, kernel_size=4, stride=2,
                               padding=1, output_padding=0, bias=False),
            nn.BatchNorm2d(width, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True))]
        deconv += [nn.Sequential(BasicBlock(width, width)) for _ in range(deconv_blocks)]
        self.deconv_layers = nn.ModuleList([nn.Sequential(*deconv)])
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: conv weights N(0, 0.001), biases 0, BN (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ #
    # Feature catalogue
    # ------------------------------------------------------------------ #
    def feature_specs(self) -> dict[str, tuple[int, int]]:
        """``{name: (channels, stride)}`` of every feature :meth:`features` can return."""
        w, j = self.width, self.num_joints
        specs = {"stem": (64 * Bottleneck.expansion, 4)}
        for k in (2, 3, 4):
            for i in range(1 if k == 4 else k):
                specs[f"stage{k}.b{i}"] = (w * 2 ** i, 4 * 2 ** i)
            specs[f"stage{k}"] = (w, 4)
        specs.update({"final": (2 * j, 4), "deconv": (w, 2), "final_half": (j, 2)})
        return specs

    # ------------------------------------------------------------------ #
    # Forward
    # ------------------------------------------------------------------ #
    def _run(self, x: Tensor, want: Optional[set[str]]) -> dict[str, Tensor]:
        """Run the (padded) network, recording named features; stop once ``want`` is covered
        (``want=None`` runs to the end). Features are at the padded size."""
        feats: dict[str, Tensor] = {}

        def done() -> bool:
            return want is not None and want.issubset(feats)

        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        feats["stem"] = x
        ys = [x]
        for k in (2, 3, 4):
            if done():
                return feats
            transition = getattr(self, f"transition{k - 1}")
            ys = getattr(self, f"stage{k}")(apply_transition(transition, ys))
            for i, y in enumerate(ys):
                feats[f"stage{k}.b{i}"] = y
            feats[f"stage{k}"] = ys[0]
        if done():
            return feats
        x = ys[0]
        y = self.final_layers[0](x)
        feats["final"] = y
        if done():
            return feats
        x = self.deconv_layers[0](torch.cat((x, y), 1))
        feats["deconv"] = x
        feats["final_half"] = self.final_layers[1](x)
        return feats

    def _pad(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Check ``x`` [B,3,H,W]; zero-pad bottom/right to multiples of 32. Returns (x, H, W)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"HigherHRNet expects images of shape [B,3,H,W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        m = self.PAD_MULTIPLE
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return x, h, w

    @staticmethod
    def _crop(t: Tensor, h: int, w: int, stride: int) -> Tensor:
        return t[..., : math.ceil(h / stride), : math.ceil(w / stride)]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x`` [B,3,H,W] (normalised) -> ``[out_1/4 [B,2J,ceil(H/4),ceil(W/4)],
        out_1/2 [B,J,ceil(H/2),ceil(W/2)]]``; ``out_1/4[:, :J]`` are heatmaps, ``[:, J:]`` tags."""
        xp, h, w = self._pad(x)
        feats = self._run(xp, None)
        return [self._crop(feats["final"], h, w, 4), self._crop(feats["final_half"], h, w, 2)]

    def features(self, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Named intermediate features of one forward pass on ``x`` [B,3,H,W].

        Returns ``{name: [B, C, ceil(H/s), ceil(W/s)]}`` with ``(C, s)`` from
        :meth:`feature_specs`; the network stops as soon as every name is computed.
        Unknown names raise ``KeyError`` listing the known ones.
        """
        specs = self.feature_specs()
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise KeyError(f"unknown HigherHRNet feature(s) {unknown}; known: {list(specs)}")
        xp, h, w = self._pad(x)
        feats = self._run(xp, set(names))
        return {n: self._crop(feats[n], h, w, specs[n][1]) for n in names}

    # ------------------------------------------------------------------ #
    # Teacher mode
    # ------------------------------------------------------------------ #
    def freeze(self) -> "HigherHRNet":
        """Make this a fixed teacher: eval mode, ``requires_grad=False`` everywhere, and
        :meth:`train` keeps it in eval mode from now on (so ``parent.train()`` on a module
        holding the teacher cannot switch its BatchNorms to batch statistics)."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "HigherHRNet":
        return super().train(mode and not self.frozen)


def higherhrnet_w32(checkpoint: str | Path | None = None) -> HigherHRNet:
    """HigherHRNet-W32 with 17 COCO joints (the ``w32_512`` config), in train mode.

    With ``checkpoint``, weights are loaded by :func:`load_weights` (strict: every
    key and shape must match). Use :func:`load_teacher` for a frozen teacher.
    """
    model = HigherHRNet(width=32, num_joints=17, deconv_blocks=4)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


# ---------------------------------------------------------------------- #
# Checkpoints
# ---------------------------------------------------------------------- #
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, Tensor]:
    """Find the ``{key: Tensor}`` state_dict inside a loaded checkpoint object.

    Accepts a raw state_dict, or a dict wrapping one under ``state_dict``,
    ``model_state_dict``, ``model``, ``module``, ``net`` or ``weights`` (nested
    wrappers too; non-dict values under those keys, e.g. a model name string, are
    skipped). A ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile)
    prefix shared by all keys is stripped. Raises :class:`CheckpointError` naming
    ``source`` and the top-level keys if no state_dict is found.
    """
    cur = obj
    for _ in range(4):
        if _is_state_dict(cur):
            break
        inner = None
        if isinstance(cur, Mapping):
            inner = next((cur[k] for k in _WRAPPER_KEYS if isinstance(cur.get(k), Mapping)), None)
        if inner is None:
            what = (f"a dict with keys {sorted(map(str, cur))[:20]}" if isinstance(cur, Mapping)
                    else f"a {type(cur).__name__}")
            raise CheckpointError(
                f"{source}: no state_dict found (got {what}); expected a {{name: tensor}} dict, "
                f"possibly under one of {list(_WRAPPER_KEYS)}")
        cur = inner
    else:
        raise CheckpointError(f"{source}: no state_dict found within 4 levels of wrapping")
    sd = dict(cur)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def load_weights(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load weights from ``path`` into ``model`` (strict) and return ``model``.

    The file may hold a raw state_dict or a wrapped one (see :func:`unwrap_state_dict`),
    including a threempose run checkpoint (its ``model`` entry). ``model`` may be any module.
    It is read with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError (``threempose.engine.checkpoint``): unreadable file or no state_dict
            inside; its subclass :class:`StateDictMismatchError` when keys/shapes do not fit
            ``model`` (the first mismatches of each kind are listed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    obj = read_torch_file(path, map_location, "a weights file",
                          "re-save just its state_dict with torch.save(model.state_dict(), ...)")
    sd = unwrap_state_dict(obj, str(path))
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    return model


def load_teacher(cfg: TeacherConfig, device: str | torch.device | None = None) -> HigherHRNet:
    """The frozen teacher for the RDM student-teacher loss (thesis §3.4).

    Only ``cfg.model == "higherhrnet-w32"`` is built here: HigherHRNet-W32 with the
    weights of ``cfg.checkpoint``, moved to ``device``, in eval mode with every
    ``requires_grad`` False (:meth:`HigherHRNet.freeze`). ``cfg.layers`` must be names
    from :meth:`HigherHRNet.feature_specs`; pass them to ``teacher.features``.
    A ``"threempose"`` teacher (a trained derived network) is built from its genotype
    by ``threempose.nas.derived``, not here.

    Raises:
        ValueError: no checkpoint configured, unknown layer names, or a model kind
            this function does not build.
        FileNotFoundError, CheckpointError: from :func:`load_weights`.
    """
    if cfg.model != "higherhrnet-w32":
        raise ValueError(
            f"load_teacher builds only the 'higherhrnet-w32' teacher; loss.teacher.model="
            f"{cfg.model!r} (a trained threempose network) is built from its genotype by "
            f"threempose.nas.derived")
    if not cfg.checkpoint:
        raise ValueError(
            "loss.teacher.checkpoint is not set: the higherhrnet-w32 teacher needs its weights "
            "(e.g. pose_higher_hrnet_w32_512.pth); set it, or set loss.teacher_weight to 0")
    model = HigherHRNet(width=32, num_joints=17)
    known = model.feature_specs()
    bad = [n for n in cfg.layers if n not in known]
    if bad:
        raise ValueError(f"loss.teacher.layers has unknown HigherHRNet feature(s) {bad}; "
                         f"known: {list(known)}")
    load_weights(model, cfg.checkpoint)
    if device is not None:
        model.to(device)
    return model.freeze()


def profile_higherhrnet(input_hw: int | tuple[int, int] = 512) -> dict[str, float]:
    """Parameters (millions) and GFLOPs (multiply-adds, :mod:`threempose.util.flops`) of
    HigherHRNet-W32 on one [1,3,H,W] image. At 512x512: 28.65 M, 46.2 G."""
    h, w = (input_hw, input_hw) if isinstance(input_hw, int) else input_hw
    model = higherhrnet_w32()
    return {"params_m": count_params(model) / 1e6, "gflops": model_gflops(model, (h, w))}
