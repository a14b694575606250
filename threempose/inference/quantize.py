"""Static int8 post-training quantization of exported exit segments (onnxruntime, QDQ).

    images = calibration_images("calib/")                        # RGB uint8 arrays, >= 1 readable
    inputs = network_inputs(images, short_side=512)              # predictor's: normalised [1, 3, H, W]
    quantize_export("export-fp32/", "export-int8/", inputs)      # same layout, int8 ONNX segments
    segments = load_segments("export-int8/", runtime="onnxruntime")

What it does, segment by segment, in exit order (the thesis net: stem -> exit 4, -> exit 7, ->
exit 10): the float32 ONNX segment is pre-processed (:func:`quant_pre_process`: symbolic shape
inference and onnxruntime's graph optimizations, so each BatchNorm is folded into its
convolution before quantization; then its average pools rewritten as depthwise convolutions,
since onnxruntime's int8 average pool is 10-50x slower, and its means over ``H, W`` as global
average pools, :mod:`~threempose.inference.onnx_pools`), calibrated on real inputs (the images
for the first segment; for a later one the features the float32 chain carries into it from
the same images), and written as a QDQ model by ``onnxruntime.quantization.quantize_static``:

* weights int8, **per output channel**, symmetric;
* activations uint8, **per tensor**, asymmetric, ranges from MinMax calibration (the ``U8S8``
  form onnxruntime's CPU provider runs with VNNI ``vpdpbusd`` on x86);
* max pools stay float32 (between dequantize and quantize nodes: onnxruntime's uint8 max pool
  outside its NHWC kernels is ~30x slower than float32), except where onnxruntime takes them
  into its NHWC int8 kernels: a pool's input and output get the same MinMax range, so
  onnxruntime fuses the three into a uint8 pool, and where that lands on the generic kernel
  the output's scale is moved one float32 step
  (:func:`~threempose.inference.onnx_pools.avoid_generic_uint8_max_pools`);
* the heads' last convolutions (the ones producing ``heatmaps`` and ``tags``) stay float32, so
  the segments return float32 heatmaps and tags at full resolution: dynamic-exit scoring and
  decoding read float32 maps (a per-tensor uint8 heatmap would keep only ~255 levels between
  the tag extremes).

The output directory is an export like :func:`~threempose.inference.segments.export_segments`'
(the same metadata with ``"precision": "int8"`` and ``"formats": ["onnx"]``, the ``exitN.onnx`` files
quantized), written to a temporary directory beside it and renamed, so it appears complete or
not at all.

Why onnxruntime and not PyTorch's PT2E X86 quantizer: measured on the 2-core ``avx512_vnni``
EPYC (README, "Low-precision inference"), onnxruntime's int8 segments run in one thread
without compiling anything, quantize in seconds and keep the export's dynamic batch and size;
PT2E's int8 speed needs ``torch.compile`` (Inductor) per input size, minutes of compilation on
this machine before the first image, and with torch 2.13 / torchao 0.18 it does not run the
thesis net as int8 at all (its quantizer trips on the fabric's conv-add-ReLU patterns and
Inductor's freezing pass on the converted graph; unfrozen, it ran 0.70x the fp32 deploy form).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from threempose.data.image_io import ImageReadError, read_image
from threempose.inference.onnx_pools import (average_pools_as_convs, avoid_generic_uint8_max_pools,
                                             global_means_as_pools)
from threempose.util.errors import UserError
from threempose.util.files import staged_dir

PRECISIONS = ("fp32", "bf16", "int8")
MAX_CALIBRATION_IMAGES = 32          # more adds time and memory, hardly accuracy (MinMax ranges)
ORT_QUANT_MISSING = ("--precision int8 needs the optional packages onnx, onnxscript and onnxruntime: "
                     "pip install 'threempose[onnx]'")


class QuantizeInputError(UserError, ValueError):
    """Quantization cannot run as asked (no calibration images, none readable, missing packages)."""


class PrecisionError(UserError, ValueError):
    """A precision this machine cannot run, or one asked for without what it needs."""


def check_precision(precision: str, calibration: Optional[str | os.PathLike] = None,
                    device: str = "cpu") -> None:
    """Raise :class:`PrecisionError` (one line naming what is missing) unless ``precision``
    (one of :data:`PRECISIONS`) can run here on ``device``: bf16 needs CUDA or a CPU with
    native bf16 (:func:`threempose.inference.deploy.cpu_bf16_missing`); int8 needs calibration images, the
    CPU and onnxruntime's quantization tools."""
    from threempose.inference.deploy import cpu_bf16_missing

    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and str(device).startswith("cpu"):
        missing = cpu_bf16_missing()
        if missing is not None:
            raise PrecisionError(f"--precision bf16 cannot run on this machine: it needs {missing}")
    if precision == "int8":
        if not str(device).startswith("cpu"):
            raise PrecisionError(f"--precision int8 runs on the CPU (onnxruntime), not {device}")
        if calibration is None:
            raise PrecisionError("--precision int8 needs --calibration-images DIR (real images to calibrate "
                                 "the activation ranges on)")
        try:
            import onnx  # noqa: F401
            import onnxruntime.quantization  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise PrecisionError(ORT_QUANT_MISSING) from None


def calibration_images(folder: str | os.PathLike, limit: int = MAX_CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Up to ``limit`` readable images of ``folder`` (sorted by name; unreadable files skipped),
    each RGB uint8 ``[H, W, 3]``. Raises :class:`QuantizeInputError` when ``folder`` is not a
    directory or holds no readable image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizeInputError(f"--calibration-images {folder}: not a directory")
    images, unreadable = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if len(images) == limit:
            break
        try:
            images.append(np.asarray(read_image(path)))
        except ImageReadError:
            unreadable += 1
    if not images:
        raise QuantizeInputError(f"--calibration-images {folder}: no readable image "
                                 f"({unreadable} unreadable file(s)); int8 calibration needs real images")
    return images


class _Feeds:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._feeds, None)


def output_nodes(model, names: Sequence[str]) -> list[str]:
    """The names of the compute nodes (``Conv``, ``MatMul``, ``Gemm``) whose result reaches the
    graph outputs ``names`` through shape-only nodes (Slice, Split, Reshape, ...)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found, todo, seen = [], list(names), set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            found.append(node.name)
        else:
            todo.extend(node.input)
    return found


def quantize_segment(fp32_path: Path, int8_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                     outputs: Sequence[str] = ("heatmaps", "tags")) -> None:
    """Quantize one ONNX segment (module docstring) calibrated on ``feeds`` (input name ->
    float32 array, one dict per calibration input)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)    # onnxruntime's symbolic pass gives up on the fabric's resizes
    model = onnx.shape_inference.infer_shapes(onnx.load(str(prepared)))
    if average_pools_as_convs(model) + global_means_as_pools(model):
        onnx.save(model, str(prepared))
    # max pools stay float32: where onnxruntime cannot give a uint8 MaxPool its NHWC kernel it runs
    # a generic one (~6 ms at 32 x 128 x 128, vs ~0.1 ms in float32 between DequantizeLinear and
    # QuantizeLinear); measured 13% off the thesis net's int8 time
    keep_float = output_nodes(model, outputs) + [n.name for n in model.graph.node if n.op_type == "MaxPool"]
    quantize_static(str(prepared), str(int8_path), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=keep_float,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    prepared.unlink()
    avoid_generic_uint8_max_pools(int8_path)


def quantize_export(src: str | os.PathLike, out: str | os.PathLike, inputs: Sequence[np.ndarray]) -> Path:
    """Write an int8 copy of the float32 export ``src`` (with ONNX segments) to ``out``,
    calibrated on ``inputs`` (float32 ``[1, 3, H, W]`` network inputs,
    :func:`threempose.inference.predictor.network_inputs`). Returns ``out``; ``src`` is unchanged.

    Raises :class:`QuantizeInputError` without inputs, ONNX segments or the packages."""
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise QuantizeInputError(ORT_QUANT_MISSING) from None
    from threempose.inference.segments import META_FILE, read_metadata, segment_specs

    src, out = Path(src), Path(out)
    meta = read_metadata(src)
    if "onnx" not in meta.get("formats", []) or meta.get("precision", "fp32") != "fp32":
        raise QuantizeInputError(f"{src}: int8 quantization starts from a float32 export with ONNX segments")
    if not inputs:
        raise QuantizeInputError("int8 quantization needs at least one calibration image")
    with staged_dir(out, replace=True) as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        starts: list[list[np.ndarray]] = [[x] for x in inputs]     # each input's tensors into the segment
        for spec in segment_specs(meta):
            fp32 = src / f"{spec.name}.onnx"
            feeds = [dict(zip(spec.inputs, tensors)) for tensors in starts]
            quantize_segment(fp32, tmp / f"{spec.name}.onnx", feeds)
            carried = spec.outputs[2:]
            if carried:                          # the float32 chain's features into the next segment
                session = onnxruntime.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
                starts = [session.run(carried, feed) for feed in feeds]
        meta = {**meta, "precision": "int8", "formats": ["onnx"],
                "quantization": {"engine": "onnxruntime", "format": "QDQ", "weights": "int8 per channel",
                                 "activations": "uint8 per tensor (MinMax)",
                                 "calibration_inputs": len(inputs)}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def export_int8(net, out: str | os.PathLike, infer: dict, inputs: Sequence[np.ndarray]) -> Path:
    """Export ``net`` as int8 onnxruntime segments into ``out``: a float32 ONNX export in a
    temporary directory, quantized (:func:`quantize_export`) on ``inputs`` (network inputs,
    :func:`threempose.inference.predictor.network_inputs`)."""
    from threempose.inference.segments import check_export_dir, export_segments

    out = check_export_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as tmp:
        fp32 = export_segments(net, Path(tmp) / "fp32", infer, formats=["onnx"])
        return quantize_export(fp32, out, inputs)


def quantize_network(net, infer: dict, inputs: Sequence[np.ndarray], threads: Optional[int] = None):
    """``net`` (a :class:`~threempose.nas.derived.DerivedNet`) as int8 onnxruntime segments
    (:class:`~threempose.inference.segments.ExportedSegments`): exported to ONNX and quantized
    (:func:`quantize_export`) in a temporary directory, calibrated on ``inputs`` (network
    inputs, :func:`threempose.inference.predictor.network_inputs`), loaded, and the files
    removed."""
    from threempose.inference.segments import export_segments, load_segments

    with tempfile.TemporaryDirectory(prefix="threempose-int8-") as tmp:
        fp32 = export_segments(net, Path(tmp) / "fp32", infer, formats=["onnx"])
        int8 = quantize_export(fp32, Path(tmp) / "int8", inputs)
        return load_segments(int8, "onnxruntime", threads)
