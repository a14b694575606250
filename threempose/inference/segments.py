"""Exit segments: the export writer and the runtime reader of one format.

Writing (:func:`export_segments`, behind ``python -m threempose.export``): one segment per exit (:meth:`DerivedNet.segment`), so a runtime outside PyTorch can stop early
exactly as :class:`threempose.inference.predictor.Predictor` does (the thesis network: stem -> exit 4,
exit 4 -> exit 7, exit 7 -> exit 10). ``DIR`` holds::

    threempose.json      metadata: exit layers, each segment's files, inputs and outputs, the
                         ONNX opset, the model's infer settings and genotype
    exit4.pt2            torch.export program (torch.export.load) of the segment ending at exit 4
    exit4.onnx           the same program as an ONNX model (dynamo exporter, opset ONNX_OPSET)
    exit7.pt2, exit7.onnx, exit10.pt2, exit10.onnx

Segment signatures (float32; a bf16 export's rows bfloat16; ``h_r = H / 2**(r+2)``; names as in the ONNX models)::

    first:  images [B, 3, H, W]                     -> heatmaps, tags [B, J, H/4, W/4], out_row0..K, out_skip
    middle: row0..rowK [B, C*2**r, h_r, w_r], skip  -> heatmaps, tags, out_row0..K', out_skip
    last:   row0..rowK, skip                        -> heatmaps, tags

``row*`` and ``skip`` are the carried features (:class:`~threempose.nas.fabric.Carry`: the EEL
layer's rows and its fused Fuse-Split features; no ``skip`` without Fuse-Split); a segment's
``out_*`` are the next one's inputs, and the next segment runs the EEL's Split first. Images are normalised as
:func:`threempose.inference.predictor.prepare_image` does. Batch, ``H`` and ``W`` are dynamic: any batch
size and any ``H``, ``W`` that are multiples of 32 (what the predictor pads to) from 96 to 8192
(``MIN_SIZE_UNITS``), from one export. :func:`load_segments` runs a directory
(``threempose.infer --runtime onnxruntime --onnx DIR``).

TorchScript is no longer written: it baked one input size into the trace, always computed every
exit, and is deprecated in current PyTorch; the ``.pt2`` programs serve PyTorch (and
AOTInductor) and the ONNX models every other runtime.

Reading (:func:`load_segments`, behind ``threempose.infer --runtime``)::

    segments = load_segments("exported/", runtime="onnxruntime")    # or "torch.export" (the .pt2 programs)
    predictor = Predictor(segments, infer_settings(segments.infer))  # same exits, same decoding
    out, carry = segments.segment(images)                            # as DerivedNet.segment

:class:`ExportedSegments` has what :class:`~threempose.inference.predictor.Predictor` uses of a
:class:`~threempose.nas.derived.DerivedNet`: ``genotype``, ``num_joints``, ``segment(start)``
(images ``[B, 3, H, W]`` or a :class:`~threempose.nas.fabric.Carry` -> ``(ExitOutput, carry)``),
``iter_exits`` and ``exit_gflops``; so dynamic exits, batching and decoding are the Predictor's
own code whatever runs the network. Tensors go in and come out on the CPU (onnxruntime's
CPUExecutionProvider; the torch programs run where they were loaded, the CPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.inference.used_weights import modules_used, pruned_copy
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import Carry, iter_segments
from threempose.nas.fuse_split import ExitOutput
from threempose.nas.genotype import Genotype
from threempose.util.cli import check_output_dir
from threempose.util.errors import UserError
from threempose.util.files import staged_dir

META_FILE = "threempose.json"


FORMAT = "threempose-segments/1"


FORMATS = ("pt2", "onnx")


ONNX_OPSET = 18


SIZE_MULTIPLE = 32
# H and W in [32 * MIN_SIZE_UNITS, 32 * MAX_SIZE_UNITS]: 96 to 8192 pixels. Below 96 the 1/32 row is
# 1 or 2 pixels and a zoomed conv halves it to 1, where the traced bilinear resize takes another path
# (torch.export specialises on it); the predictor's inputs (short side 512 by default) are far above.
MIN_SIZE_UNITS, MAX_SIZE_UNITS = 3, 256


EXAMPLE_HW = (128, 160)                  # the example input the programs are traced with


ONNX_MISSING = ("ONNX export needs the optional packages onnx and onnxscript: "
                "pip install 'threempose[onnx]'")


class ExportError(UserError, ValueError):
    """Export cannot be done as asked (missing optional packages, bad output directory)."""


@dataclass(frozen=True)
class SegmentSpec:
    """One exit segment's place and signature.

    start: the EEL layer whose carry it starts from, 0 for the images.
    layer: its exit's layer.
    inputs, outputs: tensor names in order (``images`` or ``row<r>``/``skip``; ``heatmaps``,
        ``tags``, then the carry's names unless it is the last segment).
    """

    start: int
    layer: int
    inputs: list[str]
    outputs: list[str]

    @property
    def name(self) -> str:
        return f"exit{self.layer}"

    @property
    def carry_rows(self) -> list[int]:
        """The rows of the carry it returns (empty for the last segment)."""
        return [int(n[len("out_row"):]) for n in self.outputs if n.startswith("out_row")]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "layer": self.layer, "inputs": self.inputs, "outputs": self.outputs}


def carry_names(carry: Carry, prefix: str = "") -> list[str]:
    """Names of :meth:`Carry.tensors`, in its order (``prefix`` ``"out_"`` for outputs: ONNX names
    must differ from the inputs')."""
    return [f"{prefix}row{r}" for r in sorted(carry.feats)] + ([f"{prefix}skip"] if carry.skip is not None else [])


class ExitSegment(nn.Module):
    """One exit segment of ``net`` with flat tensor inputs and outputs (the module docstring's
    signatures): ``forward(*inputs) -> (heatmaps, tags, *carried)``."""

    def __init__(self, net: DerivedNet, spec: SegmentSpec, start_rows: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.start_rows = list(start_rows)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        start = inputs[0] if self.spec.start == 0 else Carry.from_tensors(self.spec.start, self.start_rows, inputs)
        out, carry = self.net.segment(start)
        return (out.heatmaps, out.tags, *(carry.tensors() if carry is not None else ()))


def trace_segments(net: DerivedNet) -> list[tuple[ExitSegment, tuple[Tensor, ...], dict[str, Any]]]:
    """Each segment's module, example inputs (batch 2, :data:`EXAMPLE_HW`) and the
    ``torch.export`` dynamic shapes making batch, ``H`` and ``W`` (multiples of 32) free. Each
    module holds only the submodules (so the weights) its segment runs
    (:mod:`threempose.inference.used_weights`)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    h = torch.export.Dim("h32", min=MIN_SIZE_UNITS, max=MAX_SIZE_UNITS)
    w = torch.export.Dim("w32", min=MIN_SIZE_UNITS, max=MAX_SIZE_UNITS)
    start: Tensor | Carry = torch.randn(2, 3, *EXAMPLE_HW, generator=torch.Generator().manual_seed(0))
    segments = []
    with torch.no_grad():
        while start is not None:
            if isinstance(start, Tensor):
                inputs, names, rows, first = (start,), ["images"], [], 0
                shapes = [{0: batch, 2: SIZE_MULTIPLE * h, 3: SIZE_MULTIPLE * w}]
            else:
                inputs, names, rows, first = tuple(start.tensors()), carry_names(start), sorted(start.feats), start.layer
                # row r is H / 2**(r+2) = (8 >> r) * (H / 32); skip is row 0's size
                shapes = [{0: batch, 2: (8 >> r) * h, 3: (8 >> r) * w} for r in rows]
                shapes += [{0: batch, 2: 8 * h, 3: 8 * w}] * (len(inputs) - len(rows))
            outputs_of: list = []
            used = modules_used(net, lambda: outputs_of.append(net.segment(start)))
            out, carry = outputs_of[0]
            outputs = ["heatmaps", "tags"] + (carry_names(carry, "out_") if carry is not None else [])
            spec = SegmentSpec(first, out.layer, names, outputs)
            segments.append((ExitSegment(pruned_copy(net, used), spec, rows).eval(), inputs, {"inputs": tuple(shapes)}))
            start = carry
    return segments


def check_export_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path if an export may be written there: a new directory, an empty one or
    an earlier export; OutputPathError / ExportError naming the problem otherwise."""
    out_dir = check_output_dir(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise ExportError(f"--out {out_dir} exists and is not an earlier threempose export; choose a new directory")
    return out_dir


def export_segments(net: DerivedNet, out_dir: str | os.PathLike, infer: Optional[dict[str, Any]] = None,
                    formats: Sequence[str] = FORMATS, precision: str = "fp32") -> Path:
    """Export ``net`` (eval mode, CPU, float32) as exit segments into ``out_dir`` (see the module
    docstring); ``infer`` (the model's infer settings) goes into the metadata.

    ``precision`` ``"bf16"``: ``.pt2`` programs only (onnxruntime's CPU provider has no bf16
    convolutions) of the BatchNorm-folded network in bfloat16
    (:func:`~threempose.inference.deploy.optimize_for_inference` without oneDNN packing): images
    in float32 (cast inside), heatmaps and tags out in float32, the carried rows in bfloat16 and the
    carried ``skip`` (an exit's Fuse output, computed in float32) in float32.
    int8 is made from a float32 export: :func:`threempose.inference.quantize.export_int8`.

    The directory appears complete or not at all: everything is written to a temporary
    directory beside it and renamed. An existing ``out_dir`` is replaced only if it is empty or
    an earlier export (it holds ``threempose.json``). Raises ExportError for an unknown format,
    a missing optional package or an ``out_dir`` that is something else.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown export format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    if "onnx" in formats and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ExportError(ONNX_MISSING)
    if precision not in ("fp32", "bf16"):
        raise ExportError(f"export_segments writes fp32 or bf16 segments, not {precision!r}")
    if precision == "bf16" and formats != ["pt2"]:
        raise ExportError("bf16 exports hold .pt2 programs only (onnxruntime's CPU provider has no bf16 "
                          "convolutions); use --format pt2")
    out_dir = check_export_dir(out_dir)
    net = net.cpu().eval()
    if precision == "bf16":
        from threempose.inference.deploy import optimize_for_inference

        net = optimize_for_inference(net, (EXAMPLE_HW[0], EXAMPLE_HW[1]), fuse=False, channels_last=False,
                                     dtype=torch.bfloat16)
    with staged_dir(out_dir, replace=True) as tmp:
        specs = []
        for module, inputs, shapes in trace_segments(net):
            spec = module.spec
            with torch.no_grad():
                program = torch.export.export(module, inputs, dynamic_shapes=shapes)
            if "pt2" in formats:
                torch.export.save(program, tmp / f"{spec.name}.pt2")
            if "onnx" in formats:
                _save_onnx(program, inputs, spec, tmp / f"{spec.name}.onnx")
            specs.append(spec)
        meta = {"format": FORMAT, "precision": precision, "formats": formats,
                "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
                "exit_layers": list(net.genotype.exit_layers), "num_joints": net.num_joints,
                "stem_blocks": net.stem_blocks, "size_multiple": SIZE_MULTIPLE,
                "min_size": SIZE_MULTIPLE * MIN_SIZE_UNITS, "max_size": SIZE_MULTIPLE * MAX_SIZE_UNITS,
                "segments": [s.to_dict() for s in specs], "infer": infer or {}, "genotype": net.genotype.to_dict()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


def _save_onnx(program: torch.export.ExportedProgram, inputs: tuple[Tensor, ...], spec: SegmentSpec,
               path: Path) -> None:
    """Convert a segment's program with the dynamo ONNX exporter (opset :data:`ONNX_OPSET`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the exporter's deprecation chatter, not ours
        onnx_program = torch.onnx.export(program, inputs, dynamo=True, opset_version=ONNX_OPSET,
                                         input_names=spec.inputs, output_names=spec.outputs,
                                         verbose=False, report=False)
    onnx_program.save(str(path))


def read_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an export directory; ValueError when it is not one."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: not a threempose export directory (no {META_FILE}); "
                                "write one with python -m threempose.export")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} export (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def segment_specs(meta: dict[str, Any]) -> list[SegmentSpec]:
    """The :class:`SegmentSpec` list of an export's metadata."""
    return [SegmentSpec(s["start"], s["layer"], list(s["inputs"]), list(s["outputs"])) for s in meta["segments"]]

RUNTIMES = ("onnxruntime", "torch.export")
ORT_MISSING = "the onnxruntime runtime needs the optional package onnxruntime: pip install 'threempose[onnx]'"

# one segment: its input tensors in the spec's order -> its output tensors in order
RunFn = Callable[[Sequence[Tensor]], list[Tensor]]


class MissingRuntimeError(UserError, ImportError):
    """The runtime asked for is not installed (its optional extra names the fix)."""


class ExportedSegments:
    """An export directory's segments behind :meth:`DerivedNet.segment`'s interface.

    Args:
        meta: the directory's metadata (:func:`threempose.inference.segments.read_metadata`).
        runs: one :data:`RunFn` per segment, in exit order.
    """

    def __init__(self, meta: dict[str, Any], runs: Sequence[RunFn]) -> None:
        self.meta = meta
        self.specs: list[SegmentSpec] = segment_specs(meta)
        if len(runs) != len(self.specs):
            raise ValueError(f"{len(self.specs)} segments need {len(self.specs)} runners, got {len(runs)}")
        self.runs = list(runs)
        self.genotype = Genotype.from_dict(meta["genotype"], source="export metadata")
        self.num_joints = int(meta["num_joints"])
        self.size_multiple = int(meta["size_multiple"])
        self.size_range = (int(meta["min_size"]), int(meta["max_size"]))
        self.infer: dict[str, Any] = meta.get("infer", {})
        self._index = {spec.start: i for i, spec in enumerate(self.specs)}
        with torch.device("meta"):               # shapes only: for exit_gflops
            self._shape_net = DerivedNet(self.genotype, self.num_joints, int(meta["stem_blocks"]))

    def segment(self, start: Tensor | Carry) -> tuple[ExitOutput, Optional[Carry]]:
        """As :meth:`DerivedNet.segment`: images ``[B, 3, H, W]`` (``H``, ``W`` multiples of
        32 in the export's ``min_size..max_size``) or an EEL's carry -> ``(exit output, carry or None at the last exit)``."""
        if isinstance(start, Tensor):
            lo, hi = self.size_range
            if (start.dim() != 4 or start.shape[1] != 3
                    or any(s % self.size_multiple or not lo <= s <= hi for s in start.shape[-2:])):
                raise ValueError(f"exported segments take images [B, 3, H, W] with H and W multiples of "
                                 f"{self.size_multiple} from {lo} to {hi}, got {tuple(start.shape)}")
            key, inputs = 0, [start]
        else:
            key, inputs = start.layer, start.tensors()
        if key not in self._index:
            raise ValueError(f"no exported segment starts at layer {key}; segments start at {sorted(self._index)}")
        spec = self.specs[self._index[key]]
        if len(inputs) != len(spec.inputs):
            raise ValueError(f"segment {spec.name} takes {spec.inputs}, got {len(inputs)} tensors")
        outputs = self.runs[self._index[key]](inputs)   # each run casts to its program's input dtypes
        out = ExitOutput(spec.layer, outputs[0], outputs[1])
        rows = spec.carry_rows
        return out, (Carry.from_tensors(spec.layer, rows, outputs[2:]) if len(outputs) > 2 else None)

    def iter_exits(self, images: Tensor) -> Iterator[ExitOutput]:
        """Every exit in order, lazily (as :meth:`DerivedNet.iter_exits`)."""
        return iter_segments(self.segment, images)

    def exit_gflops(self, input_hw: tuple[int, int] | int) -> dict[int, float]:
        """The network's static GFLOPs per exit (:meth:`FabricNet.exit_gflops`)."""
        return self._shape_net.exit_gflops(input_hw)


def load_segments(out_dir: str | os.PathLike, runtime: str = "onnxruntime", threads: Optional[int] = None
                  ) -> ExportedSegments:
    """Load an export directory for ``runtime``: ``"onnxruntime"`` (the ``.onnx`` models) or
    ``"torch.export"`` (the ``.pt2`` programs, ``torch.export.load``). ``threads``: onnxruntime's intra-op threads (default:
    its own choice). Raises FileNotFoundError / ValueError naming what is missing."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    out_dir = Path(out_dir)
    meta = read_metadata(out_dir)
    ext = "onnx" if runtime == "onnxruntime" else "pt2"
    files = [out_dir / f"{spec.name}.{ext}" for spec in segment_specs(meta)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: missing {', '.join(missing)} (exported formats: "
                                f"{meta.get('formats')}); export again with --format {ext}")
    if runtime == "torch.export":
        return ExportedSegments(meta, [_torch_run(torch.export.load(str(f)).module()) for f in files])
    try:
        import onnxruntime
    except ImportError:
        raise MissingRuntimeError(ORT_MISSING) from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    sessions = [onnxruntime.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in files]
    return ExportedSegments(meta, [_ort_run(s, spec) for s, spec in zip(sessions, segment_specs(meta))])


def _torch_run(module: torch.fx.GraphModule) -> RunFn:
    """Run a loaded ``.pt2`` program, each input cast to the dtype it was exported with (a bf16
    export takes float32 images and skip, bfloat16 rows)."""
    dtypes = [node.meta["val"].dtype for node in module.graph.nodes if node.op == "placeholder"]

    def run(inputs: Sequence[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            return list(module(*[x.cpu().to(d).contiguous() for x, d in zip(inputs, dtypes)]))
    return run


def _ort_run(session: Any, spec: SegmentSpec) -> RunFn:
    """Run an onnxruntime session (float32 inputs: fp32 and int8 QDQ exports alike)."""
    def run(inputs: Sequence[Tensor]) -> list[Tensor]:
        feeds = {name: x.detach().cpu().float().contiguous().numpy() for name, x in zip(spec.inputs, inputs)}
        return [torch.from_numpy(y) for y in session.run(spec.outputs, feeds)]
    return run


