"""The deploy form's stride-1 pools (threempose.inference.fast_pooling) against PyTorch's own
``max_pool2d`` / ``avg_pool2d``, and their swap-in by optimize_for_inference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from threempose.inference.deploy import cpu_bf16_missing, optimize_for_inference
from threempose.inference.fast_pooling import speed_up_pools
from threempose.nas import ops

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="the fast pools run on oneDNN, not available in this torch build")
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    cpu_bf16_missing() is not None, reason=f"no native bf16 on this CPU ({cpu_bf16_missing()})"))
GEOMETRIES = [(3, 1), (5, 2), (3, 0), (2, 1)]   # (kernel, padding)


def swapped(pool: nn.Module, x: torch.Tensor) -> nn.Module:
    pool = copy.deepcopy(pool)
    speed_up_pools(pool, {pool: tuple(x.shape)}, x.dtype)
    return pool


def inputs(dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    # small integers: many ties inside windows, exact in bf16
    x = torch.randint(-4, 5, (2, 6, 9, 7), generator=torch.Generator().manual_seed(0)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("k, p", GEOMETRIES)
def test_max_pool_equals_pytorch(dtype, channels_last, k, p):
    x = inputs(dtype, channels_last)
    pool = swapped(nn.MaxPool2d(k, 1, p), x)
    assert type(pool).__name__ == "SeparableMaxPool2d" and isinstance(pool, nn.MaxPool2d)
    with torch.no_grad():
        got = pool(x)
    assert got.dtype == dtype and torch.equal(got, F.max_pool2d(x, k, 1, p))
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), pytest.param(*BF16.values, 1e-2, marks=BF16.marks)])
@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("k, p", GEOMETRIES)
def test_avg_pool_equals_pytorch(dtype, tol, count_include_pad, k, p):
    x = torch.randn(2, 6, 9, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    pool = swapped(nn.AvgPool2d(k, 1, p, count_include_pad=count_include_pad), x)
    assert type(pool).__name__ == "ConvAvgPool2d" and isinstance(pool, nn.AvgPool2d)
    expected = F.avg_pool2d(x.float(), k, 1, p, count_include_pad=count_include_pad)
    with torch.no_grad():
        got = pool(x)
        assert got.dtype == dtype and got.shape == expected.shape
        assert (got.float() - expected).abs().max() <= tol * expected.abs().max()
        # another input size than the one packed for: new window counts, same results
        y = x[:, :, :5, :4]
        assert torch.allclose(pool(y).float(), F.avg_pool2d(y.float(), k, 1, p, count_include_pad=count_include_pad),
                              atol=tol * 4, rtol=0)


def test_border_counts_by_hand():
    """Padding not counted: a corner of a 3x3 window sees 4 pixels, an edge 6, the inside 9."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = swapped(ops.AvgPool(1), x)(x)
    assert got[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert got[0, 0, 0, 1].item() == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 6)
    assert got[0, 0, 1, 1].item() == pytest.approx(sum([0, 1, 2, 4, 5, 6, 8, 9, 10]) / 9)


def test_only_stride1_square_pools_are_swapped():
    x = torch.randn(1, 4, 8, 8)
    kept = [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1, return_indices=True), nn.MaxPool2d(3, 1, 1, dilation=2),
            nn.AvgPool2d(3, 1, 1, divisor_override=2), nn.AvgPool2d((3, 1), 1, (1, 0)), nn.AvgPool2d(3, 1, 1, ceil_mode=True)]
    net = nn.ModuleList(kept + [ops.MaxPool(4), ops.AvgPool(4)])
    speed_up_pools(net, {m: tuple(x.shape) for m in net}, None)
    assert [type(m) for m in net[:len(kept)]] == [type(m) for m in kept]
    assert type(net[-2]).__name__ == "SeparableMaxPool" and isinstance(net[-2], ops.MaxPool)
    assert type(net[-1]).__name__ == "ConvAvgPool" and isinstance(net[-1], ops.AvgPool)
    assert net[-1].macs(8, 8) == 0                       # the op's own methods stay


def test_copies_pack_again():
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    pool = swapped(ops.AvgPool(4), x)
    other = copy.deepcopy(pool)
    assert other.packed_ones is not pool.packed_ones
    with torch.no_grad():
        assert torch.equal(other(x), pool(x))


@pytest.mark.parametrize("dtype", [None, BF16])
def test_optimize_for_inference_swaps_the_fabric_pools(dtype):
    """A tiny net of the fabric's pool ops: swapped under fusion (outputs checked by
    optimize_for_inference itself and here), left alone without it."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ops.MaxPool(8), ops.AvgPool(8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 32, 24)
    fast = optimize_for_inference(net, (32, 24), dtype=dtype)
    plain = optimize_for_inference(net, (32, 24), dtype=dtype, fuse=False)
    assert [type(m).__name__ for m in fast[1:3]] == ["SeparableMaxPool", "ConvAvgPool"]
    assert [type(m) for m in plain[1:3]] == [ops.MaxPool, ops.AvgPool]
    with torch.no_grad():
        expected = net(x)
        got = fast(x).float()
    tol = 1e-5 if dtype is None else 3e-2
    assert (got - expected).abs().max() <= tol * expected.abs().max()
