"""threempose.inference.onnx_pools: an ONNX AveragePool rewritten as depthwise convolutions gives
the pool's own results in onnxruntime (and PyTorch's avg_pool2d), at any input size."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="the ONNX rewrite needs the optional package onnx")
ort = pytest.importorskip("onnxruntime", reason="running the rewritten graph needs the optional onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from threempose.inference.onnx_pools import average_pools_as_convs  # noqa: E402

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
