"""mixed_op_sum: Triton kernel (interpreter on CPU) vs the PyTorch reference vs float64 closed form.

Tolerances: float32 forward/backward vs float64 closed form rtol=atol=1e-5 (K <= 9 float32
products summed in float32); Triton vs reference: identical forward (same float32 operation
order) up to 1e-6, backward 1e-5 (block-wise vs whole-tensor dot products); bfloat16 (GPU):
2 bf16 ulps relative (rtol=atol=1.6e-2) against the float32 result.
"""
import pytest
import torch
from devices import DEV, HAS_CUDA, gpu

from threempose.kernels import backend, mixed_op_sum, mixed_op_sum_reference, use_backend



def _closed_form(outputs, weights, gy):
    """float64 ``sum_k w_k O_k`` and its gradients, written out by hand."""
    o64 = torch.stack([o.detach().double() for o in outputs])
    w64 = weights.detach().double()
    y = torch.einsum("k,k...->...", w64, o64)
    g64 = gy.double()
    gx = [w64[k] * g64 for k in range(len(outputs))]
    gw = torch.stack([(g64 * o64[k]).sum() for k in range(len(outputs))])
    return y, gx, gw


def _inputs(K, shape, seed, zero=()):
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(shape, generator=gen).to(DEV).requires_grad_(True) for _ in range(K)]
    w = torch.randn(K, generator=gen)
    for k in zero:
        w[k] = 0.0
    return outs, w.to(DEV).requires_grad_(True)


@pytest.mark.parametrize("K", range(1, 10))
def test_triton_matches_reference_and_closed_form(triton_backend, K):
    shape = (2, 3, 7, 5)                      # 210 elements: not a multiple of anything nice
    outs, w = _inputs(K, shape, seed=K, zero=(K // 2,) if K > 1 else ())
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(100 + K)).to(DEV)

    y = mixed_op_sum(outs, w)
    grads = torch.autograd.grad(y, [w, *outs], gy)
    assert backend.launch_counts == {"mixed_op_sum_fwd": 1, "mixed_op_sum_bwd": 1}
    y_ref = mixed_op_sum_reference(outs, w)
    grads_ref = torch.autograd.grad(y_ref, [w, *outs], gy)
    y64, gx64, gw64 = _closed_form(outs, w, gy)

    assert y.dtype == torch.float32 and y.shape == shape
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), gw64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_ref[0].double(), gw64, rtol=1e-5, atol=1e-5)
    for g, g_ref, g64 in zip(grads[1:], grads_ref[1:], gx64):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5)


def test_multi_block_and_partial_last_block(triton_backend):
    """More elements than one program's block (2048): partial dL/dw sums across programs."""
    outs, w = _inputs(3, (3, 1000), seed=7)
    gy = torch.randn(3, 1000, generator=torch.Generator().manual_seed(8)).to(DEV)
    y = mixed_op_sum(outs, w)
    grads = torch.autograd.grad(y, [w, *outs], gy)
    y64, gx64, gw64 = _closed_form(outs, w, gy)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), gw64, rtol=1e-5, atol=1e-4)
    for g, g64 in zip(grads[1:], gx64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_zero_weight_outputs_are_not_read_but_get_weight_gradients(impl):
    """A NaN in an exactly-zero-weighted output must not reach the sum (it is not read), yet
    the straight-through gradient of its weight is <dL/dh, O_k> (here NaN, since O_k is)."""
    if impl == "triton" and not (HAS_CUDA or backend.interpreting()):
        pytest.fail("no GPU and no TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(3)
    a, c = (torch.randn(4, 6, generator=gen).to(DEV) for _ in range(2))
    poisoned = torch.full((4, 6), float("nan"), device=DEV)
    w = torch.tensor([1.0, 0.0, -0.0], device=DEV).requires_grad_(True)   # -0.0 counts as 0
    outs = [a.requires_grad_(True), poisoned.requires_grad_(True), c.requires_grad_(True)]
    with use_backend(impl):
        y = mixed_op_sum(outs, w)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, a.detach())
        gw, ga, gp = torch.autograd.grad(y.sum(), [w, outs[0], outs[1]])
    assert gw[0].item() == pytest.approx(a.sum().item(), rel=1e-5)
    assert torch.isnan(gw[1])                       # the zero-weight output WAS read here
    assert gw[2].item() == pytest.approx(c.sum().item(), rel=1e-5)
    torch.testing.assert_close(ga, torch.ones_like(a))
    assert (gp == 0).all()                          # dL/dO_k = w_k * dL/dh = 0


def test_straight_through_weights_all_zero_gives_zeros(triton_backend):
    outs, _ = _inputs(4, (5, 3), seed=1)
    w = torch.zeros(4, device=DEV, requires_grad=True)
    y = mixed_op_sum(outs, w)
    assert (y == 0).all()
    (gw,) = torch.autograd.grad(y.sum(), [w])
    torch.testing.assert_close(gw, torch.stack([o.detach().sum() for o in outs]),
                               rtol=1e-5, atol=1e-5)


def test_channels_last_and_non_contiguous_inputs(triton_backend):
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(2, 5, 3, 3, generator=gen).to(DEV) for _ in range(3)]
    w = torch.tensor([0.5, -1.0, 2.0], device=DEV)
    cl = [b.to(memory_format=torch.channels_last).requires_grad_(True) for b in base]
    y = mixed_op_sum(cl, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, 0.5 * base[0] - base[1] + 2.0 * base[2])
    (g0,) = torch.autograd.grad(y.sum(), [cl[0]])
    torch.testing.assert_close(g0, torch.full_like(base[0], 0.5))
    transposed = [b.transpose(1, 3) for b in base]                 # strided views
    torch.testing.assert_close(mixed_op_sum(transposed, w),
                               (0.5 * base[0] - base[1] + 2.0 * base[2]).transpose(1, 3))


def test_only_weights_or_only_outputs_need_grad(triton_backend):
    outs, w = _inputs(2, (9,), seed=11)
    frozen = [o.detach() for o in outs]
    (gw,) = torch.autograd.grad(mixed_op_sum(frozen, w).sum(), [w])
    torch.testing.assert_close(gw, torch.stack([o.sum() for o in frozen]), rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(mixed_op_sum([frozen[0], outs[1]], w.detach()).sum(), [outs[1]])
    torch.testing.assert_close(g1, torch.full_like(g1, w[1].item()))


def test_validation_errors_name_the_problem():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at least one"):
        mixed_op_sum([], torch.zeros(0))
    with pytest.raises(ValueError, match="length K = 2"):
        mixed_op_sum([x, x], torch.zeros(3))
    with pytest.raises(ValueError, match="output 1 is"):
        mixed_op_sum([x, torch.zeros(3, 2)], torch.zeros(2))
    with pytest.raises(ValueError, match="floating point"):
        mixed_op_sum([x], torch.zeros(1, dtype=torch.int64))


@gpu
@pytest.mark.parametrize("K", [1, 4, 9])
def test_bf16_on_gpu(K):
    gen = torch.Generator().manual_seed(K)
    outs = [torch.randn(2, 32, 17, 19, generator=gen).cuda().bfloat16().requires_grad_(True)
            for _ in range(K)]
    w = torch.randn(K, generator=gen).cuda().requires_grad_(True)
    gy = torch.randn(2, 32, 17, 19, generator=gen).cuda().bfloat16()
    with use_backend("triton"):
        y = mixed_op_sum(outs, w)
        grads = torch.autograd.grad(y, [w, *outs], gy)
    y_ref = mixed_op_sum_reference(outs, w)
    grads_ref = torch.autograd.grad(y_ref, [w, *outs], gy)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-4, atol=1e-3)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_mixed_dtypes_under_cpu_autocast_are_promoted(impl):
    """Under autocast a conv's output is bf16 and an identity's stays float32: the sum is taken
    in the promoted dtype (float32), and each output's gradient keeps that output's dtype."""
    if impl == "triton" and not backend.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1 (set by conftest)")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 5, 6, generator=gen).requires_grad_(True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    w = torch.tensor([0.75, -1.5], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(impl):
        outs = [conv(x), x]
        assert [o.dtype for o in outs] == [torch.bfloat16, torch.float32]
        y = mixed_op_sum(outs, w)
    assert y.dtype == torch.float32
    y64, _, _ = _closed_form(outs, w, torch.ones_like(y))
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    gw, g_conv, g_x = torch.autograd.grad(y.sum(), [w, outs[0], x])
    assert g_conv.dtype == torch.bfloat16 and g_x.dtype == torch.float32
    torch.testing.assert_close(gw, torch.stack([outs[0].detach().float().sum(), x.detach().sum()]),
                               rtol=1e-5, atol=1e-4)
