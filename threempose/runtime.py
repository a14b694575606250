"""Run exported exit segments (:mod:`threempose.export`) with the derived network's interface.

    segments = load_segments("exported/", runtime="onnxruntime")    # or "torch.export" (the .pt2 programs)
    predictor = Predictor(segments, infer_settings(segments.infer))  # same exits, same decoding
    out, carry = segments.segment(images)                            # as DerivedNet.segment

:class:`ExportedSegments` has what :class:`~threempose.predictor.Predictor` uses of a
:class:`~threempose.nas.derived.DerivedNet`: ``genotype``, ``num_joints``, ``segment(start)``
(images ``[B, 3, H, W]`` or a :class:`~threempose.nas.fabric.Carry` -> ``(ExitOutput, carry)``),
``iter_exits`` and ``exit_gflops``; so dynamic exits, batching and decoding are the Predictor's
own code whatever runs the network. Tensors go in and come out on the CPU (onnxruntime's
CPUExecutionProvider; the torch programs run where they were loaded, the CPU).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from threempose.cli import UserError
from threempose.export import SegmentSpec, read_metadata, segment_specs
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import Carry, iter_segments
from threempose.nas.fuse_split import ExitOutput
from threempose.nas.genotype import Genotype

RUNTIMES = ("onnxruntime", "torch.export")
ORT_MISSING = "the onnxruntime runtime needs the optional package onnxruntime: pip install 'threempose[onnx]'"

# one segment: its input tensors in the spec's order -> its output tensors in order
RunFn = Callable[[Sequence[Tensor]], list[Tensor]]


class MissingRuntimeError(UserError, ImportError):
    """The runtime asked for is not installed (its optional extra names the fix)."""


class ExportedSegments:
    """An export directory's segments behind :meth:`DerivedNet.segment`'s interface.

    Args:
        meta: the directory's metadata (:func:`threempose.export.read_metadata`).
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
        outputs = self.runs[self._index[key]]([x.float().contiguous() for x in inputs])
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


def _torch_run(module: torch.nn.Module) -> RunFn:
    def run(inputs: Sequence[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            return list(module(*[x.cpu() for x in inputs]))
    return run


def _ort_run(session: Any, spec: SegmentSpec) -> RunFn:
    def run(inputs: Sequence[Tensor]) -> list[Tensor]:
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(spec.inputs, inputs)}
        return [torch.from_numpy(y) for y in session.run(spec.outputs, feeds)]
    return run
