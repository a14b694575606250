"""Typed JSON configs: loading, ``"extends"``, validation.

A config file is a JSON object whose sections map onto the dataclasses below.
Every key is checked on load: an unknown key, a value of the wrong type or a
missing ``extends`` target raises :class:`ConfigError` naming the key and the
file it came from. A config may start with ``"extends": "other.json"`` (a path
relative to the extending file); the extending file's keys are merged over the
base recursively (objects merge, everything else replaces).

Usage::

    cfg = load_config("configs/search-small.json")
    cfg.model.channels, cfg.search.epochs
    cfg = load_config("configs/search.json", overrides={"search": {"epochs": 1}})
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from threempose.util.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file is missing, malformed, or has an unknown/badly typed key."""


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #
@dataclass
class SyntheticConfig:
    """The embedded synthetic COCO-format data set (generated on demand; ``format: "mpii"`` adds
    the MPII JSON form of the same people, for PNFS mode)."""

    train_images: int = 64          # images in the train split
    val_images: int = 16            # images in the val split
    seed: int = 0                   # generation seed (byte-identical output per seed)
    min_size: int = 256             # image side lengths are drawn in [min_size, max_size]
    max_size: int = 640
    max_people: int = 4             # 0..max_people stick figures per image
    cache_dir: str = "~/.cache/threempose/synthetic"
    format: Literal["coco", "mpii"] = "coco"   # mpii: also MPII-form JSON (16 joints; PNFS mode)


@dataclass
class AugmentConfig:
    """Random affine augmentation (thesis §4.1)."""

    scale_min: float = 0.75
    scale_max: float = 1.25
    rotation: float = 30.0          # degrees, drawn uniformly in [-rotation, rotation]
    translation: float = 40.0       # pixels (at input_size), in [-translation, translation]
    flip: bool = True               # horizontal flip with probability 0.5 (COCO flip pairs)
    device: Literal["auto", "cpu", "gpu"] = "auto"  # where the warp runs (auto: gpu on CUDA runs)


@dataclass
class DataConfig:
    """Where images and annotations come from and how targets are made."""

    dataset: Literal["synthetic", "coco", "mpii"] = "synthetic"   # mpii: PNFS mode only
    root: str = "data/coco"         # COCO root: annotations/ and {split}/ image folders; MPII root:
                                    # annot/{split}.json (HRNet's MPII JSON) and images/
    train_split: str = "train2017"
    val_split: str = "val2017"
    input_size: int = 512           # square training crop
    heatmap_stride: int = 4         # heatmaps/tags are at 1/4 of the input
    sigma: float = 2.0              # Gaussian sigma in heatmap pixels
    max_people: int = 30            # joint arrays for the AE loss hold up to this many people
    num_joints: int = 17
    batch_size: int = 8
    num_workers: int = 2            # DataLoader workers (torch) / DALI CPU threads (dali)
    backend: Literal["torch", "dali"] = "torch"   # dali: NVIDIA DALI graph (pip install -e ".[dali]")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class CellOptions:
    """What the thesis leaves open about a cell, one setting for every cell of a fabric (config
    ``model.cell_options``, genotype ``cell_options``; the defaults are threempose's reading,
    README "Thesis choices")."""

    hidden_sum: bool = False          # Eq. 3.6's fixed sum_{k<j} h_k added to hidden node h_j
    se_reduction: int = 4             # squeeze-and-excite squeeze width: max(1, C // se_reduction)
    sep_conv_repeats: int = 1         # depthwise-pointwise pairs in sep_conv (DARTS uses 2)


@dataclass
class ModelConfig:
    """The fabric supernet (thesis §3.1-3.3)."""

    rows: int = 4
    layers: int = 10
    channels: int = 32              # C: row r has width C * 2**r
    hidden: int = 2                 # H hidden nodes per cell
    eels: list[int] = field(default_factory=lambda: [4, 7])
    fuse_split: bool = True
    num_joints: int = 17
    ops: list[str] = field(default_factory=lambda: [
        "identity", "conv", "avg_pool", "max_pool", "residual",
        "sep_conv", "csi", "zoom_conv", "se"])
    r_alpha: int = 2                # Dyn-EGS states for ops per edge (1..r_alpha ops)
    r_beta: int = 3                 # Dyn-EGS states for inputs per cell (1..r_beta inputs)
    sampling: Literal["dyn_egs", "argmax", "dense"] = "dyn_egs"
    dyn_egs_sampling: Literal["topk", "ensemble"] = "topk"   # §3.3's sum of i+1 draws: one Gumbel draw's
                                    # top-(i+1) (topk) or i+1 one-hot Gumbel-softmax draws OR-ed (ensemble)
    stem_blocks: int = 4            # residual (bottleneck) units in the HRNet stem
    cell_options: CellOptions = field(default_factory=CellOptions)


@dataclass
class TeacherConfig:
    """The teacher for the RDM student-teacher loss (thesis §3.4)."""

    model: Literal["higherhrnet-w32", "threempose"] = "higherhrnet-w32"
    checkpoint: Optional[str] = None   # HigherHRNet .pth or a threempose model.pt; needed when
                                       # the teacher loss is on
    layers: list[str] = field(default_factory=lambda: [
        "stage2", "stage3", "stage4", "final"])


@dataclass
class CostConfig:
    """What the cost constraint ``(cost / T) ** w`` measures (the thesis: GFLOPs).

    ``metric: "latency"`` prices the sampled architecture with a latency table measured on the
    target device (``python -m threempose.latency``) at the search's ``data.input_size``.
    """

    metric: Literal["gflops", "latency"] = "gflops"
    target: Optional[float] = None     # T in the metric's unit (GFLOPs or ms); None: flops_target (gflops)
    lut: Optional[str] = None          # the latency table (JSON), for metric "latency"
    target_device: Optional[Literal["cpu", "cuda"]] = None  # the table's device when it is not the
                                       # run's (e.g. a CPU table while searching on a GPU): a warning,
                                       # not an error
    target_precision: Literal["fp32", "bf16"] = "fp32"  # the deploy precision the table must be timed in


@dataclass
class LossConfig:
    """Loss terms and weights (thesis §3.4, §4.1). A weight of 0 switches a term off."""

    heatmap_weight: float = 1.0
    grouping_weight: float = 1e-3
    teacher_weight: float = 1.0
    flops_weight: float = 1e-3
    flops_target: float = 47.8        # T, GFLOPs (multiply-adds)
    flops_exponent: float = 0.15      # w
    flops_scale_start: float = 1e-4   # step schedule: x10 every flops_scale_every epochs ...
    flops_scale_every: int = 3
    flops_scale_max: float = 1.0      # ... capped here
    cost: CostConfig = field(default_factory=CostConfig)   # the metric the flops_* settings constrain
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class SearchConfig:
    """Architecture search (thesis §4.1 "Searching", PNFS §III-F)."""

    strategy: Literal["bilevel", "synchronous", "random"] = "bilevel"
    epochs: int = 35
    weight_lr: float = 1e-3
    arch_lr: float = 5e-3
    arch_lr_milestones: list[int] = field(default_factory=lambda: [20, 25])
    arch_lr_gamma: float = 0.5
    arch_val_fraction: float = 0.5    # part of the train split held out for alpha/beta/m
    arch_weight_decay: float = 0.0    # bilevel: the arch Adam's L2 weight decay (PNFS' first-order
                                      # baseline: 0.001, §IV-B; the thesis gives none)
    tau_start: float = 10.0
    tau_end: float = 0.001
    grad_clip: Optional[float] = 5.0
    max_steps_per_epoch: Optional[int] = None


@dataclass
class TrainConfig:
    """Training a derived network (thesis §4.1 "Training")."""

    epochs: int = 300
    lr: float = 1e-3
    lr_milestones: list[int] = field(default_factory=lambda: [200, 260])
    lr_gamma: float = 0.1
    grad_clip: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None


@dataclass
class EELConfig:
    """Dynamic-inference confidence at one early exit (thesis Eq. 3.4)."""

    layer: int
    c0: float = 1.0
    c1: float = 1.0
    c2: float = 1.0
    threshold: float = 1.0


@dataclass
class InferConfig:
    """Test-time settings (thesis §3.1.4, §4.1 "Testing")."""

    short_side: int = 512
    flip_test: bool = True
    top_k: int = 30                   # candidates per joint
    nms_kernel: int = 5               # heatmap NMS max-pool window (at the decoding resolution)
    project_to_input: bool = True     # decode at the input resolution (HigherHRNet's PROJECT2IMAGE)
    detection_threshold: float = 0.1
    tag_threshold: float = 1.0
    adjust: bool = True
    refine: bool = True
    exit: str = "final"               # "4", "7", ..., "final" or "dynamic"
    eels: list[EELConfig] = field(default_factory=lambda: [
        EELConfig(layer=4, c0=1.0, c1=1.0, c2=1.0, threshold=1.0),
        EELConfig(layer=7, c0=2.0, c1=1.0, c2=1.0, threshold=0.6)])


@dataclass
class RunConfig:
    """Run-wide settings: seeds, devices, output directory, logging."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    kernels: Literal["auto", "triton", "reference"] = "auto"
    log_every: int = 10
    val_ap_images: int = 16           # images of the val split scored each epoch
    progress: bool = True
    threads: int = 0                  # torch intra-op threads; 0: chosen from the usable cores
                                      # (threempose.util.threads); a run records what it used
    activation_checkpointing: bool = False   # recompute cells', Fuse blocks' activations in backward
                                      # (threempose.nas.checkpointing; under DeepSpeed its
                                      # deepspeed.activation_checkpointing section applies)


@dataclass
class TopDownConfig:
    """Top-down (PNFS) crops, augmentation, targets and test-time settings."""

    input_width: int = 288            # W: crop width in pixels (PNFS COCO: 384 x 288)
    input_height: int = 384           # H: crop height
    heatmap_stride: int = 4           # score maps are at 1/stride of the crop
    sigma: float = 3.0                # Gaussian sigma in heatmap pixels (2.0 suits 256 x 192)
    box_padding: float = 1.25         # box size factor after the aspect-ratio fix
    scale_min: float = 0.7            # training: box size x U[scale_min, scale_max]
    scale_max: float = 1.3
    rotation: float = 45.0            # training: U[-rotation, rotation] degrees
    flip: bool = True                 # training: horizontal flip with probability 1/2
    vector_dim: int = 8               # d: vector in pixel length (1 = plain heatmap)
    min_keypoints: int = 1            # people with fewer labelled joints are not samples
    detection_threshold: float = 0.0  # evaluation on detections: boxes scoring less are dropped
    flip_test: bool = True            # inference: average with the flipped crop
    keypoint_threshold: float = 0.2   # inference: joints scoring above it make a person's mean score
    oks_nms_threshold: float = 0.9    # inference: drop a person whose OKS to a better one exceeds it

    def __post_init__(self) -> None:
        for name in ("input_width", "input_height", "heatmap_stride", "vector_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TopDownConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_width", "input_height"):
            if getattr(self, name) % self.heatmap_stride:
                raise ValueError(f"TopDownConfig.{name} ({getattr(self, name)}) must be a multiple of "
                                 f"heatmap_stride ({self.heatmap_stride})")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"TopDownConfig needs 0 < scale_min <= scale_max, got "
                             f"{self.scale_min}, {self.scale_max}")
        if self.sigma <= 0 or self.box_padding <= 0 or self.rotation < 0:
            raise ValueError("TopDownConfig.sigma and box_padding must be > 0 and rotation >= 0")

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """``(h, w)`` of the score maps."""
        return self.input_height // self.heatmap_stride, self.input_width // self.heatmap_stride


@dataclass
class PnfsConfig:
    """PNFS mode: top-down part-specific neural fabrics (:mod:`threempose.pnfs`).

    The part subnetworks are fabrics of the ``model`` section (``rows``, ``layers`` kept,
    ``channels`` = row-0 width, ``hidden``, ``ops``, ``sampling``, ``r_alpha``, ``r_beta``;
    ``eels`` must be empty). PNFS' channel factor C gives row 0 ``4C`` channels (a node at
    scale s has ``C / s``), so PNFS' C = 10 is ``channels: 40``. ``search`` and ``train`` drive
    the optimisation; ``data`` names the data set (its crop settings are ``pnfs.topdown``).
    """

    enabled: bool = False
    num_parts: int = 3                # P: a body-part mode of PNFS Table I (1, 3, 5 or 8)
    backbone: Literal["fabric", "hrnet", "mobilenet_v2", "resnet50"] = "fabric"
    backbone_channels: int = 40       # fabric: its row-0 width; hrnet: the HRNet width (32 = W32); not mobilenet_v2
    backbone_layers: int = 3          # fabric: the first m layers of a fabric (Table VIII "layers reserved")
    backbone_hidden: int = 2          # fabric: H of its cells
    backbone_ops: list[str] = field(default_factory=lambda: [     # PNFS §III-B's six ops
        "zero", "identity", "sep_conv", "dil_conv", "avg_pool", "max_pool"])
    backbone_checkpoint: Optional[str] = None   # hrnet: HRNet / HigherHRNet weights for stem..stage 3;
                                                # mobilenet_v2 / resnet50: a torchvision mobilenet_v2 /
                                                # resnet50 state_dict
                                                # (ImageNet); None: random initialisation
    share_alpha: bool = True          # one alpha per fabric (PNFS §III-F), else one per cell
    prune_threshold: float = 1e-3     # dense search: ops and inputs weighted below it are pruned
    weight_lr_milestones: list[int] = field(default_factory=lambda: [90, 120, 150])   # search
    weight_lr_gamma: float = 0.25
    detections: Optional[str] = None  # evaluation boxes: COCO detection results (None: GT boxes)
    topdown: TopDownConfig = field(default_factory=TopDownConfig)


@dataclass
class Config:
    """A whole threempose config (search, train or infer use what they need)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    pnfs: PnfsConfig = field(default_factory=PnfsConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # passed to DeepSpeed as is
    source: Optional[str] = None      # the file this config was loaded from (set by load_config)


# --------------------------------------------------------------------------- #
# Loading and validation
# --------------------------------------------------------------------------- #
def _merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` into a copy of ``base`` (objects merge, rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _Sources:
    """Which file set each key of a merged config (for error messages): ``of("data.root")``
    is the file whose value won, else the nearest enclosing key's, else ``default``."""

    def __init__(self, default: str, origins: Optional[dict[str, str]] = None):
        self.default, self.origins = default, origins or {}

    def of(self, key: str) -> str:
        key = key.split("[", 1)[0]
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.default


def _key_origins(raw: dict, source: str, prefix: str = "") -> dict[str, str]:
    """``{dotted key: source}`` for every key (nested objects included) of ``raw``."""
    out = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out[key] = source
        if isinstance(v, dict):
            out.update(_key_origins(v, source, key))
    return out


def _read_raw(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a JSON config, resolving ``extends`` chains (cycles are errors).

    Returns the merged dict and ``{dotted key: file that set it}``."""
    name, path = str(path), path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'extends' cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    origins = _key_origins(raw, name)
    if base_name is None:
        return raw, origins
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'extends' must be a file name, got {base_name!r}")
    base, base_origins = _read_raw(path.parent / base_name, chain + (path,))
    return _merge(base, raw), {**base_origins, **origins}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, src: _Sources) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{src.of(key)}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src.of(key)}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_convert(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {k: _convert(v, args[1], f"{key}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, src)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise bad
        return value
    raise TypeError(f"config schema uses an unsupported type {tp!r} for '{key}'")


def _build(cls: type, raw: dict, prefix: str, src: _Sources) -> Any:
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{src.of(key)}: unknown key '{key}' (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            kwargs[f.name] = _convert(raw[f.name], hints[f.name], key, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src.of(prefix)}: required key '{key}' is missing")
    return cls(**kwargs)


def config_from_dict(raw: dict, source: str = "<dict>", origins: Optional[dict[str, str]] = None) -> Config:
    """Validate a plain dict (already merged) into a :class:`Config`; ``origins`` (``{dotted key:
    file}``) names the file of a bad key in errors (default: ``source``)."""
    raw = dict(raw)
    raw.pop("source", None)
    cfg = _build(Config, raw, "", _Sources(source, origins))
    cfg.source = source
    _check_semantics(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: Optional[dict] = None) -> Config:
    """Load, merge (``extends``), override and validate a JSON config file.

    ``overrides`` is a nested dict merged over the file's contents (used by
    tests and command-line ``--set`` options).
    """
    path = Path(path)
    raw, origins = _read_raw(path)
    if overrides:
        raw = _merge(raw, overrides)
    return config_from_dict(raw, str(path), origins)


def check_config_command(path: str | Path, command: str) -> None:
    """Refuse a config written for the other job: ``train`` with a config that has a ``search``
    section and no ``train`` section (e.g. ``configs/search-small.json``), and vice versa.
    Raises :class:`ConfigError` naming the command to run it with."""
    other = {"search": "train", "train": "search"}[command]
    raw, _ = _read_raw(Path(path))
    if other in raw and command not in raw:
        raise ConfigError(f"{path} is a {other} config (it has a '{other}' section and no '{command}' "
                          f"section); run it with: python -m threempose.{other} --config {path}")


def config_to_dict(cfg: Config) -> dict:
    """The config as a plain JSON-serialisable dict (``source`` dropped)."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return d


def _check_semantics(cfg: Config, src: str) -> None:
    """Cross-field checks that types alone cannot express."""
    m = cfg.model
    if m.rows < 1 or m.layers < 1 or m.channels < 1 or m.hidden < 1:
        raise ConfigError(f"{src}: model.rows, layers, channels and hidden must be >= 1")
    if m.cell_options.se_reduction < 1 or m.cell_options.sep_conv_repeats < 1:
        raise ConfigError(f"{src}: model.cell_options.se_reduction and sep_conv_repeats must be >= 1")
    for e in m.eels:
        if not 1 <= e < m.layers:
            raise ConfigError(f"{src}: model.eels entry {e} must be a layer in 1..{m.layers - 1}")
    if cfg.data.augment.scale_min > cfg.data.augment.scale_max:
        raise ConfigError(f"{src}: data.augment.scale_min must be <= scale_max")
    syn = cfg.data.synthetic
    if syn.train_images < 0 or syn.val_images < 0 or syn.max_people < 0:
        raise ConfigError(f"{src}: data.synthetic.train_images, val_images and max_people must be >= 0, "
                          f"got {syn.train_images}, {syn.val_images}, {syn.max_people}")
    if not 16 <= syn.min_size <= syn.max_size:
        raise ConfigError(f"{src}: data.synthetic needs 16 <= min_size <= max_size, got min_size "
                          f"{syn.min_size}, max_size {syn.max_size}")
    if cfg.data.input_size % cfg.data.heatmap_stride:
        raise ConfigError(f"{src}: data.input_size must be a multiple of data.heatmap_stride")
    if not 0.0 < cfg.search.arch_val_fraction < 1.0:
        raise ConfigError(f"{src}: search.arch_val_fraction must be in (0, 1)")
    if cfg.search.arch_weight_decay < 0:
        raise ConfigError(f"{src}: search.arch_weight_decay must be >= 0, got {cfg.search.arch_weight_decay}")
    if cfg.data.dataset == "mpii" and not cfg.pnfs.enabled:
        raise ConfigError(f'{src}: data.dataset "mpii" is for PNFS mode (pnfs.enabled); the bottom-up '
                          'commands train on COCO-format data')
    if cfg.data.synthetic.format == "mpii" and cfg.data.dataset == "synthetic" and not cfg.pnfs.enabled:
        raise ConfigError(f'{src}: data.synthetic.format "mpii" is for PNFS mode (pnfs.enabled)')
    if cfg.pnfs.enabled and cfg.data.backend == "dali":
        raise ConfigError(f'{src}: data.backend "dali" feeds the bottom-up pipeline; PNFS mode\'s top-down '
                          'crops (pnfs.enabled) use the torch backend')
    cost = cfg.loss.cost
    if cost.target is not None and cost.target <= 0:
        raise ConfigError(f"{src}: loss.cost.target must be > 0, got {cost.target}")
    if cost.metric == "latency" and (cost.target is None or cost.lut is None):
        raise ConfigError(f"{src}: loss.cost.metric 'latency' needs loss.cost.target (ms) and loss.cost.lut "
                          "(a table from `python -m threempose.latency`)")
    if cost.metric == "gflops" and (cost.lut is not None or cost.target_device is not None):
        raise ConfigError(f"{src}: loss.cost.lut and loss.cost.target_device are only used with "
                          "loss.cost.metric 'latency'")
