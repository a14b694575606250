"""Pools of an ONNX graph put in the forms onnxruntime's int8 CPU kernels run fast.

Three rewrites, each exact (up to float rounding) and each measured on the thesis net's int8
segments in one thread on the 2-core ``avx512_vnni`` EPYC:

* :func:`average_pools_as_convs` (before quantization): onnxruntime runs a quantized 3 x 3
  ``AveragePool`` (its ``QLinearAveragePool``) 10-50x slower than the float one, while a
  quantized depthwise ``Conv`` runs on its fast int8 kernels. ``[1, 32, 128, 128]``, cost of
  the pool between two 1x1 convs (microseconds): float32 ``AveragePool`` 51, int8 2,701; int8
  as rewritten here 519 (float32 as rewritten: 340, so float32 exports keep their pools and
  only the graph about to be quantized is rewritten, by
  :func:`~threempose.inference.quantize.quantize_segment`).
* :func:`global_means_as_pools` (before quantization): a mean over ``H, W`` (``ReduceMean``,
  the squeeze-excite blocks' squeeze) becomes ``GlobalAveragePool``, which onnxruntime runs on
  uint8 (``QLinearGlobalAveragePool``) instead of dequantizing a whole feature map to float
  for ``ReduceMean``: the thesis net's int8 segments 100.8 -> 94.6 ms at 512 (after the next).
* :func:`avoid_generic_uint8_max_pools` (after quantization): a float ``MaxPool`` between a
  ``DequantizeLinear`` and a ``QuantizeLinear`` of the same scale and zero point is fused by
  onnxruntime into a uint8 ``MaxPool``; where its NHWC transformer then takes it (next to
  other NHWC int8 ops) that is the fastest form, but where it does not, the generic uint8
  kernel runs, ~6 ms a call at ``[1, 32, 128, 128]`` against ~0.2 ms in float32. Those pools
  get a ``QuantizeLinear`` scale one float32 step apart (the same integers come out; read back,
  they move by that step, ~1e-7 relative), so they stay float32: the thesis net's int8
  segments 107.0 -> 100.8 ms at 512.

The rewrite of ``y = AveragePool(x)`` (square kernel ``k``, stride 1, padding ``p <= k // 2``
on every side, no ceil mode; ``C`` channels known from shape inference)::

    sums   = Conv(x, ones[C, 1, k, k], group=C, pads=p)                  # window sums
    counts = Conv(ConstantOfShape([1, 1, H, W], 1.0), ones[1, 1, k, k], pads=p)
    y      = Div(sums, counts)               # counts = k * k when the padding is counted

``H, W`` are read from ``Shape(x)`` at run time, so dynamic sizes stay dynamic. Other pools,
and every pool of a graph below opset 15, are left as they are.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _channel_counts(model) -> dict[str, int]:
    """``{tensor name: static channel count (dim 1)}`` of the graph's 4-d tensors with a known
    channel dimension, from its shape information."""
    counts = {}
    for info in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            counts[info.name] = dims[1].dim_value
    return counts


def _square_stride1(attrs: dict) -> tuple[int, int] | None:
    """``(k, p)`` for a pool this module rewrites, else None."""
    kernel, strides = attrs.get("kernel_shape", []), attrs.get("strides", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    if (len(kernel) != 2 or kernel[0] != kernel[1] or list(strides) != [1, 1] or len(set(pads)) != 1
            or attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or list(attrs.get("dilations", [1, 1])) != [1, 1]):
        return None
    k, p = int(kernel[0]), int(pads[0])
    return (k, p) if p <= k // 2 else None


def average_pools_as_convs(model) -> int:
    """Rewrite ``model``'s (``onnx.ModelProto``, shape-inferred) square stride-1 ``AveragePool``
    nodes in place as above; returns how many were rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:                       # Shape's start / end attributes
        return 0
    rewritten, nodes = 0, []
    channel_counts = _channel_counts(model)
    for node in graph.node:
        attrs = _attributes(node) if node.op_type == "AveragePool" else {}
        geometry = _square_stride1(attrs) if attrs else None
        channels = channel_counts.get(node.input[0]) if geometry else None
        if not channels:
            nodes.append(node)
            continue
        (k, p), x, y = geometry, node.input[0], node.output[0]
        tag = f"{node.name or y}/as_conv"
        ones = numpy_helper.from_array(np.ones((channels, 1, k, k), np.float32), f"{tag}/ones")
        graph.initializer.append(ones)
        conv = dict(kernel_shape=[k, k], pads=[p] * 4, strides=[1, 1])
        nodes.append(helper.make_node("Conv", [x, ones.name], [f"{tag}/sums"], f"{tag}/sums", group=channels, **conv))
        if attrs.get("count_include_pad", 0):
            full = numpy_helper.from_array(np.array(k * k, np.float32), f"{tag}/window")
            graph.initializer.append(full)
            counts = full.name
        else:                     # real pixels per window: the same sums over a field of ones
            one = numpy_helper.from_array(np.ones((1, 1, k, k), np.float32), f"{tag}/one")
            head = numpy_helper.from_array(np.array([1, 1], np.int64), f"{tag}/head")
            graph.initializer.extend([one, head])
            counts = f"{tag}/counts"
            nodes += [
                helper.make_node("Shape", [x], [f"{tag}/hw"], f"{tag}/hw", start=2, end=4),
                helper.make_node("Concat", [head.name, f"{tag}/hw"], [f"{tag}/shape"], f"{tag}/shape", axis=0),
                helper.make_node("ConstantOfShape", [f"{tag}/shape"], [f"{tag}/field"], f"{tag}/field",
                                 value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
                helper.make_node("Conv", [f"{tag}/field", one.name], [counts], counts, **conv),
            ]
        nodes.append(helper.make_node("Div", [f"{tag}/sums", counts], [y], f"{tag}/mean"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten:
        onnx.checker.check_model(model)
    return rewritten


def _reduced_axes(node, initializers: dict) -> list[int] | None:
    """The axes a ``ReduceMean`` node reduces (attribute before opset 18, input from 18 on);
    None when they are not known statically."""
    attrs = _attributes(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1] in initializers:
        from onnx import numpy_helper

        return [int(a) for a in numpy_helper.to_array(initializers[node.input[1]]).ravel()]
    return None


def global_means_as_pools(model) -> int:
    """Rewrite ``model``'s ``ReduceMean`` nodes over the last two axes of a 4-d tensor, keeping
    dims (``x.mean(dim=(2, 3), keepdim=True)``), as ``GlobalAveragePool``, in place; returns
    how many were rewritten. Means over other axes, or of tensors of unknown rank, are left."""
    from onnx import helper

    initializers = {t.name: t for t in model.graph.initializer}
    ranks = {info.name: len(info.type.tensor_type.shape.dim)
             for info in (*model.graph.value_info, *model.graph.input)
             if info.type.tensor_type.HasField("shape")}
    rewritten = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        axes = _reduced_axes(node, initializers)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3] or not _attributes(node).get("keepdims", 1):
            continue
        model.graph.node[i].CopyFrom(
            helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), f"{node.name}/as_pool"))
        rewritten += 1
    return rewritten


def generic_uint8_max_pools(path: str | Path) -> set[str]:
    """Names of the ``MaxPool`` nodes of the QDQ model at ``path`` that onnxruntime's CPU
    provider runs with its generic uint8 kernel: those it keeps as a plain ``MaxPool`` fed
    by something other than a ``DequantizeLinear`` in the graph it optimizes for a session."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="threempose-ort-") as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3                  # its note that the saved graph suits this CPU only
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    producer = {out: node for node in optimized.graph.node for out in node.output}
    return {node.name for node in optimized.graph.node
            if node.op_type == "MaxPool" and node.domain in ("", "ai.onnx")
            and getattr(producer.get(node.input[0]), "op_type", None) != "DequantizeLinear"}


def avoid_generic_uint8_max_pools(path: str | Path) -> int:
    """Keep float32 the max pools of the QDQ model at ``path`` that onnxruntime would run with
    its generic uint8 kernel (:func:`generic_uint8_max_pools`): each one's output
    ``QuantizeLinear`` (and the ``DequantizeLinear`` nodes reading it) gets its own scale, one
    float32 step above the shared one, so onnxruntime no longer fuses the pool into uint8; the
    integers are the same (their values ~1e-7 relative apart). Rewrites the file in place;
    returns how many pools it changed."""
    import onnx
    from onnx import numpy_helper

    slow = generic_uint8_max_pools(path)
    if not slow:
        return 0
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    changed = 0
    for pool in (n for n in graph.node if n.name in slow):
        quantizers = [n for n in consumers[pool.output[0]] if n.op_type == "QuantizeLinear"]
        for quantize in quantizers:
            scale = numpy_helper.to_array(initializers[quantize.input[1]]).astype(np.float32)
            own = numpy_helper.from_array(np.nextafter(scale, np.float32(np.inf)), f"{quantize.name}/own_scale")
            graph.initializer.append(own)
            quantize.input[1] = own.name
            for dequantize in consumers[quantize.output[0]]:
                if dequantize.op_type == "DequantizeLinear":
                    dequantize.input[1] = own.name
        changed += bool(quantizers)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]    # shared scales no node reads now
    for t in unused:
        graph.initializer.remove(t)
    onnx.save(model, str(path))
    return changed
