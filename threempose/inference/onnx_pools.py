"""Average pools of an ONNX graph rewritten as depthwise convolutions, for onnxruntime int8.

onnxruntime runs a quantized 3 x 3 ``AveragePool`` (its ``QLinearAveragePool``) 10-50x slower
than the float one, while a quantized depthwise ``Conv`` runs on its fast int8 kernels.
Measured in one thread on the 2-core EPYC, ``[1, 32, 128, 128]``, cost of the pool between two
1x1 convs (microseconds): float32 ``AveragePool`` 51, int8 2,701; int8 as rewritten here 519
(float32 as rewritten: 340, so float32 exports keep their pools and only the graph about to be
quantized is rewritten, by :func:`~threempose.inference.quantize.quantize_segment`).

The rewrite of ``y = AveragePool(x)`` (square kernel ``k``, stride 1, padding ``p <= k // 2``
on every side, no ceil mode; ``C`` channels known from shape inference)::

    sums   = Conv(x, ones[C, 1, k, k], group=C, pads=p)                  # window sums
    counts = Conv(ConstantOfShape([1, 1, H, W], 1.0), ones[1, 1, k, k], pads=p)
    y      = Div(sums, counts)               # counts = k * k when the padding is counted

``H, W`` are read from ``Shape(x)`` at run time, so dynamic sizes stay dynamic. Other pools,
and every pool of a graph below opset 15, are left as they are.
"""
from __future__ import annotations

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
