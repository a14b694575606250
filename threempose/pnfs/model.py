"""The PNFS network: a shared backbone, P part-specific CNFs, vector-in-pixel heads (PNFS Fig. 3).

::

    crop [B, 3, H, W] -> backbone -> pyramid rows r = 0..R-1 ([B, c_r, H / 2**(r+2), W / 2**(r+2)])
        -> part p: 1x1 conv-BN per pyramid row to the part fabric's widths (none when equal)
                   -> the part's CNF (its own cells and architecture parameters)
                   -> VectorInPixelHead on the last layer's row 0: [B, J_p, d, H/4, W/4]
        -> scores [B, J, H/4, W/4]: squashed lengths, joints shared by parts summed (Eq. 6);
           J = 17 (COCO) or 16 (MPII, release order; Table I's MPII column, footnote 3)

:class:`PnfsNet` is either the search space (``architecture=None``: every op and input, each
fabric with its own architecture parameters, sampled per forward) or one searched
architecture (:class:`PnfsArchitecture`: pruned dense weights or derived genotypes). The two
share module names, so a searched network's weights load into its pruned network
(:func:`pruned_network`). Settings come from a :class:`~threempose.config.Config`: the part
fabrics are its ``model`` section, everything else its ``pnfs`` section.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from threempose.config import Config, ConfigError, config_from_dict, config_to_dict
from threempose.engine.checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint
from threempose.nas.dyn_egs import MAX_SEED
from threempose.nas.genotype import GenotypeError
from threempose.nas.ops import conv_bn
from threempose.pnfs.backbone import FabricBackbone, HRNetBackbone, MobileNetV2Backbone, ResNet50Backbone
from threempose.pnfs.cnf import FabricArchitecture, FixedFabric, PyramidGenotype, SearchableFabric, input_rows
from threempose.pnfs.parts import NUM_DATASET_JOINTS, part_groups, part_names
from threempose.pnfs.vector_head import VectorInPixelHead, part_scores
from threempose.util.files import atomic_open, read_json_file
from threempose.util.flops import measure_gflops

ARCHITECTURE_FORMAT = "threempose.pnfs-architecture/1"
MODEL_KIND = "pnfs-model"
_SEEDS_PER_STEP = 16      # fabric k of a forward with seed s draws with seed 16 s + k (P + 1 <= 9 fabrics)


def joint_set(cfg: Config) -> str:
    """The joints a PNFS config predicts: ``"mpii"`` (16, MPII release order) for MPII data (the
    MPII set or the synthetic set in its MPII format), else ``"coco"`` (17)."""
    d = cfg.data
    mpii = d.dataset == "mpii" or (d.dataset == "synthetic" and d.synthetic.format == "mpii")
    return "mpii" if mpii else "coco"


def check_pnfs_config(cfg: Config) -> None:
    """Cross-section checks of a PNFS config; :class:`ConfigError` names ``cfg.source`` and the key."""
    src, p, m = cfg.source or "<config>", cfg.pnfs, cfg.model
    if not p.enabled:
        raise ConfigError(f"{src}: not a PNFS config (pnfs.enabled is false); set it, or run the bottom-up "
                          "commands (threempose.search / train / infer) on this config")
    if p.num_parts not in (1, 3, 5, 8):
        raise ConfigError(f"{src}: pnfs.num_parts must be a PNFS Table I mode (1, 3, 5 or 8), got {p.num_parts}")
    if m.eels:
        raise ConfigError(f"{src}: model.eels must be [] in PNFS mode (a part fabric has one output, its "
                          f"last layer's row 0), got {m.eels}")
    joints = NUM_DATASET_JOINTS[joint_set(cfg)]
    if m.num_joints != joints:
        raise ConfigError(f"{src}: model.num_joints must be {joints} for {joint_set(cfg).upper()} data (PNFS "
                          f"Table I), got {m.num_joints}")
    if p.backbone != "fabric" and m.rows != 4:
        raise ConfigError(f"{src}: the {p.backbone} backbone gives a 4-row pyramid; model.rows must be 4, got {m.rows}")
    if p.backbone == "fabric" and p.backbone_layers < m.rows - 1:
        raise ConfigError(f"{src}: pnfs.backbone_layers must be >= model.rows - 1 = {m.rows - 1} (the "
                          f"backbone's last layer must hold every row), got {p.backbone_layers}")
    if p.backbone_channels < 1 or p.backbone_hidden < 1 or p.backbone_layers < 1:
        raise ConfigError(f"{src}: pnfs.backbone_channels, backbone_hidden and backbone_layers must be >= 1")
    if not 0.0 <= p.prune_threshold < 1.0 / max(len(m.ops), len(p.backbone_ops), 3):
        raise ConfigError(f"{src}: pnfs.prune_threshold must be in [0, 1/max(#ops, 3)), got {p.prune_threshold}")


# --------------------------------------------------------------------------- #
# Architectures
# --------------------------------------------------------------------------- #
@dataclass
class PnfsArchitecture:
    """A searched PNFS architecture: the fabric backbone's (None for HRNet) and every part's.

    JSON (``save`` / ``load``)::

        {"format": "threempose.pnfs-architecture/1", "num_parts": 3, "dataset": "coco" | "mpii",
         "part_names": ["head part", ...], "part_joints": [[0, 1, 2, 3, 4], ...],
         "backbone": null | {"layout": "fabric", "genotype": {...}, "weights": ...},
         "parts": [{"layout": "pyramid", "genotype": {...}, "weights": [{"index", "paths", "edges"}] | null}, ...]}
    """

    num_parts: int
    backbone: Optional[FabricArchitecture]
    parts: list[FabricArchitecture]
    dataset: str = "coco"             # whose joints the parts predict (Table I column)

    def __post_init__(self) -> None:
        if self.dataset not in NUM_DATASET_JOINTS:
            raise GenotypeError(f"architecture dataset must be one of {sorted(NUM_DATASET_JOINTS)}, got "
                                f"{self.dataset!r}")
        if len(self.parts) != len(part_groups(self.num_parts)):
            raise GenotypeError(f"P={self.num_parts} needs {self.num_parts} part architectures, got {len(self.parts)}")
        if any(not isinstance(a.genotype, PyramidGenotype) for a in self.parts):
            raise GenotypeError("part architectures must be pyramid-layout genotypes")
        if self.backbone is not None and isinstance(self.backbone.genotype, PyramidGenotype):
            raise GenotypeError("the backbone architecture must be a fabric-layout genotype")

    def to_dict(self) -> dict[str, Any]:
        return {"format": ARCHITECTURE_FORMAT, "num_parts": self.num_parts, "dataset": self.dataset,
                "part_names": part_names(self.num_parts),
                "part_joints": part_groups(self.num_parts, self.dataset),
                "backbone": None if self.backbone is None else self.backbone.to_dict(),
                "parts": [a.to_dict() for a in self.parts]}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON atomically; returns ``path``."""
        with atomic_open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return Path(path)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<architecture>") -> "PnfsArchitecture":
        if not isinstance(raw, dict) or raw.get("format") != ARCHITECTURE_FORMAT:
            raise GenotypeError(f"{source}: not a PNFS architecture ('format' must be {ARCHITECTURE_FORMAT!r})")
        if not isinstance(raw.get("parts"), list) or raw.get("num_parts") not in (1, 3, 5, 8):
            raise GenotypeError(f"{source}: needs 'num_parts' (1, 3, 5 or 8) and a 'parts' list")
        backbone = raw.get("backbone")
        try:
            return cls(raw["num_parts"],
                       None if backbone is None else FabricArchitecture.from_dict(backbone, f"{source}: backbone"),
                       [FabricArchitecture.from_dict(a, f"{source}: part {i}") for i, a in enumerate(raw["parts"])],
                       raw.get("dataset", "coco"))
        except GenotypeError as e:
            raise GenotypeError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PnfsArchitecture":
        return cls.from_dict(read_json_file(path, GenotypeError, "PNFS architecture file"), str(path))


# --------------------------------------------------------------------------- #
# Networks
# --------------------------------------------------------------------------- #
@dataclass
class PnfsOutput:
    """One forward: ``parts[p]`` ``[B, J_p, d, H/4, W/4]`` (part ``p``'s vectors) and ``scores``
    ``[B, J, H/4, W/4]`` (:func:`threempose.pnfs.vector_head.part_scores`; J = 17 or 16)."""

    parts: list[Tensor]
    scores: Tensor


class PartNet(nn.Module):
    """One part: pyramid adapters, the part's CNF, a vector-in-pixel head.

    Args:
        fabric: the part's ``"part"`` :class:`SearchableFabric` or :class:`FixedFabric`.
        pyramid_widths: the backbone's row widths.
        num_joints, vector_dim: ``J_p`` and ``d`` of the head.

    ``forward(pyramid, tau, seed)``: the backbone rows -> ``[B, J_p, d, h_0, w_0]``.
    """

    def __init__(self, fabric: Union[SearchableFabric, FixedFabric], pyramid_widths: list[int],
                 num_joints: int, vector_dim: int) -> None:
        super().__init__()
        g = fabric.genotype
        self.adapters = nn.ModuleDict()
        for r in input_rows(g):
            width = g.channels * 2 ** r
            self.adapters[str(r)] = (nn.Identity() if pyramid_widths[r] == width
                                     else conv_bn(pyramid_widths[r], width, 1, relu=False))
        self.fabric = fabric
        self.head = VectorInPixelHead(g.channels, num_joints, vector_dim)

    def forward(self, pyramid: list[Tensor], tau: float = 1.0, seed: Optional[int] = None) -> Tensor:
        feats = {int(r): adapter(pyramid[int(r)]) for r, adapter in self.adapters.items()}
        if 0 not in feats:
            # A derived part may read no row-0 input (its layer-1 cells took other rows); the
            # fabric still reads the rows' sizes from feats[0], and no cell reads its values.
            feats[0] = pyramid[0]
        return self.head(self.fabric(feats, tau, seed)[0])


class PnfsNet(nn.Module):
    """The PNFS network of ``cfg`` (module docstring).

    Args:
        cfg: a config with ``pnfs`` (parts, backbone, ``topdown.vector_dim``) and ``model`` (the
            part fabrics) sections; checked with :func:`check_pnfs_config`.
        architecture: None for the search space; else the searched architecture to build.
        load_backbone: load ``pnfs.backbone_checkpoint`` (hrnet, mobilenet_v2) when it is set.
    """

    def __init__(self, cfg: Config, architecture: Optional[PnfsArchitecture] = None,
                 load_backbone: bool = True) -> None:
        super().__init__()
        check_pnfs_config(cfg)
        p, m = cfg.pnfs, cfg.model
        self.num_parts = p.num_parts
        self.dataset = joint_set(cfg)
        self.groups = part_groups(p.num_parts, self.dataset)
        self.searchable = architecture is None
        if architecture is not None and architecture.num_parts != p.num_parts:
            raise ValueError(f"the architecture has P={architecture.num_parts} parts, the config pnfs.num_parts="
                             f"{p.num_parts}")
        if architecture is not None and architecture.dataset != self.dataset:
            raise ValueError(f"the architecture predicts {architecture.dataset.upper()} joints, the config's data "
                             f"{self.dataset.upper()} joints")
        if architecture is not None and (architecture.backbone is None) != (p.backbone != "fabric"):
            raise ValueError(f"the architecture {'has no' if architecture.backbone is None else 'has a'} fabric "
                             f"backbone, the config's pnfs.backbone is {p.backbone!r}")

        def fabric(kind: str, arch: Optional[FabricArchitecture], rows: int, layers: int, hidden: int,
                   channels: int, ops: list[str]) -> Union[SearchableFabric, FixedFabric]:
            if arch is not None:
                return FixedFabric(arch)
            return SearchableFabric(kind, rows, layers, hidden, channels, ops, m.r_alpha, m.r_beta,
                                    p.share_alpha, m.sampling, m.cell_options, m.dyn_egs_sampling)

        if p.backbone != "fabric":
            self.backbone: Union[HRNetBackbone, MobileNetV2Backbone, ResNet50Backbone, FabricBackbone] = (
                HRNetBackbone(p.backbone_channels) if p.backbone == "hrnet"
                else ResNet50Backbone() if p.backbone == "resnet50" else MobileNetV2Backbone())
            if p.backbone_checkpoint and load_backbone:
                self.backbone.load_pretrained(p.backbone_checkpoint)
        else:
            self.backbone = FabricBackbone(
                fabric("backbone", None if architecture is None else architecture.backbone, m.rows,
                       p.backbone_layers, p.backbone_hidden, p.backbone_channels, p.backbone_ops), m.stem_blocks)
        self.parts = nn.ModuleList(
            PartNet(fabric("part", None if architecture is None else architecture.parts[i], m.rows, m.layers,
                           m.hidden, m.channels, m.ops), self.backbone.widths, len(group), p.topdown.vector_dim)
            for i, group in enumerate(self.groups))

    # ---------------------------------------------------------------- fabrics
    def searchable_fabrics(self) -> list[SearchableFabric]:
        """The fabrics with architecture parameters: the backbone's (fabric backbone) then each part's."""
        fabrics = [self.backbone.fabric] if isinstance(self.backbone, FabricBackbone) else []
        return [f for f in fabrics + [part.fabric for part in self.parts] if isinstance(f, SearchableFabric)]

    def arch_parameters(self) -> list[nn.Parameter]:
        """Every fabric's alpha, beta, m_alpha, m_beta ([] for a fixed architecture)."""
        return [t for f in self.searchable_fabrics() for t in f.arch_parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (backbone, adapters, cells, heads)."""
        arch = {id(t) for t in self.arch_parameters()}
        return [t for t in self.parameters() if id(t) not in arch]

    @property
    def sampling(self) -> Optional[str]:
        fabrics = self.searchable_fabrics()
        return fabrics[0].sampling if fabrics else None

    @sampling.setter
    def sampling(self, mode: str) -> None:
        for f in self.searchable_fabrics():
            f.sampling = mode

    # ---------------------------------------------------------------- forward
    def forward(self, images: Tensor, tau: float = 1.0, seed: Optional[int] = None) -> PnfsOutput:
        """``images`` ``[B, 3, H, W]`` crops -> :class:`PnfsOutput` at 1/4 of the crop.

        ``tau`` and ``seed`` drive ``dyn_egs`` sampling (fabric ``k`` draws with ``16 seed + k``).
        """
        def seed_of(k: int) -> Optional[int]:
            return None if seed is None else (seed * _SEEDS_PER_STEP + k) % MAX_SEED

        if isinstance(self.backbone, FabricBackbone):
            pyramid = self.backbone(images, tau, seed_of(0))
        else:
            pyramid = self.backbone(images)
        parts = [part(pyramid, tau, seed_of(i + 1)) for i, part in enumerate(self.parts)]
        return PnfsOutput(parts, part_scores(parts, self.num_parts, self.dataset))

    # ----------------------------------------------------------- architecture
    def architecture(self, prune_threshold: float = 1e-3) -> PnfsArchitecture:
        """The searched architecture: in ``dense`` mode every fabric pruned at ``prune_threshold``
        (PNFS §III-F, weights kept); in ``dyn_egs`` / ``argmax`` mode the argmax genotypes."""
        if not self.searchable:
            raise ValueError("architecture(): this network is already a fixed architecture")

        def searched(f: SearchableFabric) -> FabricArchitecture:
            return f.prune(prune_threshold) if f.sampling == "dense" else f.derive()

        backbone = searched(self.backbone.fabric) if isinstance(self.backbone, FabricBackbone) else None
        return PnfsArchitecture(self.num_parts, backbone, [searched(part.fabric) for part in self.parts], self.dataset)


def pruned_network(net: PnfsNet, cfg: Config, architecture: PnfsArchitecture) -> PnfsNet:
    """The fixed network of ``architecture`` carrying ``net``'s weights (its state_dict keys are a
    subset of the searchable network's), on ``net``'s device, in ``net``'s train/eval mode."""
    fixed = PnfsNet(cfg, architecture, load_backbone=False)
    state = net.state_dict()
    wanted = fixed.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"the architecture is not a sub-architecture of the network: {missing[:5]} missing")
    fixed.load_state_dict({k: state[k] for k in wanted})
    device = next(net.parameters()).device
    return fixed.to(device).train(net.training)


# --------------------------------------------------------------------------- #
# Model files and profiles
# --------------------------------------------------------------------------- #
def save_pnfs_model(path: Union[str, Path], net: PnfsNet, cfg: Config) -> Path:
    """Write a trained fixed-architecture network: ``{"kind": "pnfs-model", "config", "architecture",
    "model"}`` (a tagged checkpoint; weights on the CPU), atomically."""
    if net.searchable:
        raise ValueError("save_pnfs_model: save the pruned / derived network (pruned_network), not the search space")
    architecture = PnfsArchitecture(
        net.num_parts, net.backbone.fabric.architecture if isinstance(net.backbone, FabricBackbone) else None,
        [part.fabric.architecture for part in net.parts], net.dataset)
    config = config_to_dict(cfg)
    config["pnfs"]["backbone_checkpoint"] = None      # the weights are in the file
    return save_checkpoint(path, {"kind": MODEL_KIND, "config": config, "architecture": architecture.to_dict(),
                                  "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}})


def load_pnfs_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[PnfsNet, Config]:
    """``(network in eval mode on device, its config)`` from :func:`save_pnfs_model`'s file.

    Raises CheckpointError when the file is missing, not a PNFS model or its weights do not fit.
    """
    state = load_checkpoint(path, required=("kind",))
    if state["kind"] != MODEL_KIND:
        raise CheckpointError(f"{path} is a threempose {state['kind']!r} file, not a PNFS model; use the "
                              "model.pt that python -m threempose.pnfs.search / .train writes")
    for key in ("config", "architecture", "model"):
        if key not in state:
            raise CheckpointError(f"{path}: PNFS model file lacks {key!r}")
    cfg = config_from_dict(state["config"], f"{path} (config)")
    net = PnfsNet(cfg, PnfsArchitecture.from_dict(state["architecture"], f"{path} (architecture)"),
                  load_backbone=False)
    check_state_dict(net, state["model"], f"{path} (weights vs its architecture)")
    net.load_state_dict(state["model"])
    return net.to(device).eval(), cfg


def is_pnfs_model_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a readable threempose checkpoint of kind ``pnfs-model``."""
    try:
        return load_checkpoint(path, required=("kind",))["kind"] == MODEL_KIND
    except CheckpointError:
        return False


def profile_pnfs(net: PnfsNet, input_hw: tuple[int, int]) -> dict[str, Any]:
    """Parameters and GFLOPs (multiply-adds, :mod:`threempose.util.flops`) of one ``H x W`` crop.

    Architecture parameters are not counted. A searchable network is measured as it runs
    (``dense``: every op and input of every live cell). Returns ``{"params_m", "gflops",
    "backbone": {"params_m", "gflops"}, "parts": [{"name", "joints", "params_m", "gflops", "cells"}]}``.
    """
    was_training = net.training
    net.eval()
    arch = {id(t) for t in net.arch_parameters()}

    def params(module: nn.Module) -> float:
        return sum(t.numel() for t in module.parameters() if id(t) not in arch) / 1e6

    device = next(net.parameters()).device
    x = torch.zeros(1, 3, *input_hw, device=device)
    try:
        with torch.no_grad():
            pyramid = (net.backbone(x, 1.0, 0) if isinstance(net.backbone, FabricBackbone) else net.backbone(x))
        backbone_gflops = measure_gflops(lambda: net.backbone(x, 1.0, 0) if isinstance(net.backbone, FabricBackbone)
                                         else net.backbone(x))
        parts = []
        for i, (part, name) in enumerate(zip(net.parts, part_names(net.num_parts))):
            g = part.fabric.genotype
            parts.append({"name": name, "joints": net.groups[i], "params_m": params(part),
                          "gflops": measure_gflops(lambda: part(pyramid, 1.0, i + 1)),
                          "cells": sum(1 for c in g.cells if not c.pruned)})
    finally:
        net.train(was_training)
    backbone = {"params_m": params(net.backbone), "gflops": backbone_gflops}
    return {"params_m": params(net), "gflops": backbone["gflops"] + sum(p["gflops"] for p in parts),
            "backbone": backbone, "parts": parts, "input_size": list(input_hw)}


__all__ = ["PnfsArchitecture", "PnfsNet", "PnfsOutput", "PartNet", "check_pnfs_config", "pruned_network",
           "save_pnfs_model", "load_pnfs_model", "is_pnfs_model_file", "profile_pnfs"]
