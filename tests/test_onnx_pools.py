"""threempose.inference.onnx_pools: an ONNX AveragePool rewritten as depthwise convolutions gives
the pool's own results in onnxruntime (and PyTorch's avg_pool2d), at any input size; a mean over
H, W rewritten as GlobalAveragePool gives the mean's; a quantized max pool that onnxruntime would
run on its generic uint8 kernel is kept float32 with the same integers out."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="the ONNX rewrite needs the optional package onnx")
ort = pytest.importorskip("onnxruntime", reason="running the rewritten graph needs the optional onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from threempose.inference.onnx_pools import (average_pools_as_convs, avoid_generic_uint8_max_pools,  # noqa: E402
                                             generic_uint8_max_pools, global_means_as_pools)

C = 5


def pool_model(opset: int = 17, **attrs) -> "onnx.ModelProto":
    """``y = AveragePool(x)`` on ``x [1, C, h, w]`` (h, w dynamic), shape-inferred."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("AveragePool", ["x"], ["y"], "pool", **attrs)
    model = helper.make_model(helper.make_graph([node], "pool", [x], [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("k, p", [(3, 1), (5, 2), (3, 0)])
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_rewritten_pool_gives_the_pools_results(k, p, count_include_pad):
    model = pool_model(kernel_shape=[k, k], strides=[1, 1], pads=[p] * 4, count_include_pad=count_include_pad)
    rewritten = pool_model(kernel_shape=[k, k], strides=[1, 1], pads=[p] * 4, count_include_pad=count_include_pad)
    assert average_pools_as_convs(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node].count("AveragePool") == 0
    assert "Conv" in [n.op_type for n in rewritten.graph.node]
    for size in [(9, 7), (6, 11)]:             # dynamic sizes: the counts follow the input
        x = np.random.default_rng(0).standard_normal((1, C, *size)).astype(np.float32)
        expected = F.avg_pool2d(torch.from_numpy(x), k, 1, p, count_include_pad=bool(count_include_pad)).numpy()
        np.testing.assert_allclose(run(model, x), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(run(rewritten, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),     # stride 2
                                   dict(kernel_shape=[3, 1], strides=[1, 1], pads=[1, 0, 1, 0]),  # not square
                                   dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4, ceil_mode=1)])
def test_other_pools_are_left_alone(attrs):
    model = pool_model(**attrs)
    assert average_pools_as_convs(model) == 0
    assert [n.op_type for n in model.graph.node] == ["AveragePool"]


def test_graph_below_opset_15_is_left_alone():
    model = pool_model(opset=13, kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4)
    assert average_pools_as_convs(model) == 0


def mean_model(axes: list[int], keepdims: int = 1, opset: int = 18) -> "onnx.ModelProto":
    """``y = ReduceMean(x, axes)`` on ``x [1, C, h, w]`` (axes an input from opset 18, else an attribute)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if opset >= 18:
        axes_init = [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)]
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], "mean", keepdims=keepdims)
    else:
        axes_init = []
        node = helper.make_node("ReduceMean", ["x"], ["y"], "mean", axes=axes, keepdims=keepdims)
    model = helper.make_model(helper.make_graph([node], "mean", [x], [y], initializer=axes_init),
                              opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes", [[2, 3], [-1, -2]])
def test_mean_over_h_w_becomes_a_global_average_pool(opset, axes):
    model = mean_model(axes, opset=opset)
    assert global_means_as_pools(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"]
    x = np.random.default_rng(1).standard_normal((1, C, 7, 10)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), x.mean(axis=(2, 3), keepdims=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axes, keepdims", [([1], 1), ([2, 3], 0), ([1, 2, 3], 1)])
def test_other_means_are_left_alone(axes, keepdims):
    model = mean_model(axes, keepdims)
    assert global_means_as_pools(model) == 0
    assert [n.op_type for n in model.graph.node] == ["ReduceMean"]


def qdq_max_pool_model(path, channels: int = 32, scale: float = 0.02) -> None:
    """``x -> Q -> DQ -> MaxPool 3x3 -> Q -> DQ -> y``, one uint8 scale throughout: what
    onnxruntime's quantizer writes around a max pool whose output range is its input's."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 16, 16])
    inits = [helper.make_tensor("x_scale", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("p_scale", TensorProto.FLOAT, [], [scale]),     # as the quantizer names them
             helper.make_tensor("z", TensorProto.UINT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "z"], ["xq"], "q_in"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "z"], ["xf"], "dq_in"),
             helper.make_node("MaxPool", ["xf"], ["p"], "pool", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("QuantizeLinear", ["p", "p_scale", "z"], ["pq"], "q_out"),
             helper.make_node("DequantizeLinear", ["pq", "p_scale", "z"], ["y"], "dq_out")]
    model = helper.make_model(helper.make_graph(nodes, "qdq_pool", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_generic_uint8_max_pool_is_kept_float_with_the_same_integers(tmp_path):
    path = tmp_path / "pool.onnx"
    qdq_max_pool_model(path)
    x = np.random.default_rng(2).uniform(0, 5, (1, 32, 16, 16)).astype(np.float32)
    before = run(onnx.load(str(path)), x)
    # onnxruntime fuses DQ -> MaxPool -> Q of one scale into a uint8 pool fed by the QuantizeLinear
    assert generic_uint8_max_pools(path) == {"pool"}
    assert avoid_generic_uint8_max_pools(path) == 1
    assert generic_uint8_max_pools(path) == set()            # now a float32 pool between DQ and Q
    model = onnx.load(str(path))
    # the same integers: the values read back move by the scale's one step (~1e-7 relative)
    np.testing.assert_allclose(run(model, x), before, rtol=3e-7, atol=0)
    expected = np.clip(np.round(x / 0.02), 0, 255) * np.float32(0.02)
    expected = F.max_pool2d(torch.from_numpy(expected), 3, 1, 1).numpy()
    np.testing.assert_allclose(run(model, x), expected, rtol=0, atol=1e-6)
    assert avoid_generic_uint8_max_pools(path) == 0           # nothing left to do the second time
    # the pool's old output scale is read by no node now: dropped (onnxruntime would warn of it)
    assert sorted(t.name for t in model.graph.initializer) == ["q_out/own_scale", "x_scale", "z"]
