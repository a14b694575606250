"""rdm_pearson: Triton (interpreter on CPU) vs reference vs scipy pdist + numpy corrcoef.

Tolerances: correlations vs scipy's float64 atol 1e-4 (float32 Grams of shifted samples);
Triton vs reference forward 1e-5; gradients vs an independent float64 implementation (explicit
pairwise differences, torch autograd) rtol 1e-3 / atol 1e-5 scaled by the gradient's size
(float32 Grams and their float32 backward); bf16 (GPU) correlations atol 2e-2.
"""
import importlib

import numpy as np
import pytest
import torch
from devices import DEV, gpu
from scipy.spatial.distance import pdist

from threempose.kernels import backend, rdm_pearson, rdm_pearson_reference, use_backend

rmod = importlib.import_module("threempose.kernels.rdm_pearson")


@pytest.fixture
def triton_backend(triton_backend, monkeypatch):
    monkeypatch.setattr(rmod, "_CHUNK", 64)     # several chunks per tensor even at tiny sizes


def _tensors(B, seed, dtype=torch.float32):
    """Student cells / teacher layers of different feature sizes (odd, non powers of two)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(1, 3, 5, 7, generator=gen)
    student = [
        torch.randn(B, 3, 5, 7, generator=gen) + 4 * common,     # large common component
        torch.randn(B, 40, generator=gen),
        torch.randn(B, 2, 9, generator=gen).abs() + 5.0,
    ]
    teacher = [student[0] * 0.5 + torch.randn(B, 3, 5, 7, generator=gen),
               torch.randn(B, 4, 4, generator=gen)]
    student = [s.to(DEV, dtype).requires_grad_(True) for s in student]
    return student, [t.to(DEV, dtype) for t in teacher]


def _scipy(student, teacher):
    B = student[0].shape[0]
    vec = [pdist(x.detach().double().cpu().reshape(B, -1).numpy()) for x in student + teacher]
    nS = len(student)
    return np.array([[np.corrcoef(vec[nS + i], vec[j])[0, 1] for j in range(nS)]
                     for i in range(len(teacher))])


def _naive64(student, teacher):
    """Independent float64 RDM Pearson by explicit pairwise differences (torch autograd)."""
    B = student[0].shape[0]
    iu, ju = torch.triu_indices(B, B, 1)

    def rdm(x):
        x = x.reshape(B, -1).double()
        return ((x[iu] - x[ju]) ** 2).sum(1).sqrt()

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm())

    ts = [rdm(t.detach()) for t in teacher]
    ss = [rdm(s) for s in student]
    return torch.stack([torch.stack([pearson(t, s) for s in ss]) for t in ts])


@pytest.mark.parametrize("B", [3, 5, 16, 17, 64])
def test_matches_scipy_reference_and_naive_gradients(triton_backend, B):
    student, teacher = _tensors(B, seed=B)
    corr = rdm_pearson(student, teacher)
    assert corr.shape == (2, 3) and corr.dtype == torch.float32
    assert backend.launch_counts == {"rdm_gram_fwd": 1}            # all 5 tensors, one launch
    np.testing.assert_allclose(corr.detach().cpu().numpy(), _scipy(student, teacher), atol=1e-4)
    corr_ref = rdm_pearson_reference(student, teacher)
    torch.testing.assert_close(corr, corr_ref, rtol=1e-5, atol=1e-5)

    gout = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).to(DEV)
    grads = torch.autograd.grad(corr, student, gout)
    assert backend.launch_counts["rdm_gram_bwd"] == 1              # all students, one launch
    grads_ref = torch.autograd.grad(corr_ref, student, gout)
    grads64 = torch.autograd.grad(_naive64(student, teacher), student, gout.double())
    for g, g_ref, g64 in zip(grads, grads_ref, grads64):
        scale = g64.abs().max().item()      # g64: float32 (the students' dtype), float64 math
        torch.testing.assert_close(g, g64, rtol=1e-3, atol=1e-5 * scale)
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5 * scale)


def test_batched_gram_forward_and_backward_for_a_generic_loss(triton_backend):
    """The Gram of shifted samples X' = X - X[0] and its gradient for an arbitrary dL/dG (the
    RDM's own dL/dG has zero column sums, which would hide a wrong row-0 term)."""
    student, _ = _tensors(9, seed=6)
    G = rmod.batched_gram(student)
    assert backend.launch_counts == {"rdm_gram_fwd": 1}
    dG = torch.randn(G.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    grads = torch.autograd.grad(G, student, dG)
    for t, (x, g) in enumerate(zip(student, grads)):
        x64 = x.detach().double().reshape(9, -1).requires_grad_(True)
        xs = x64 - x64[:1]
        G64 = xs @ xs.T
        (g64,) = torch.autograd.grad(G64, x64, dG[t].double())
        torch.testing.assert_close(G[t].double(), G64.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g.double().reshape(9, -1), g64, rtol=1e-5, atol=1e-4)


def test_teacher_gets_no_gradient_and_batch_two_gives_zero(triton_backend):
    student, teacher = _tensors(5, seed=0)
    teacher = [t.requires_grad_(True) for t in teacher]
    corr = rdm_pearson(student, teacher)
    assert not any(t.grad_fn for t in teacher)
    assert torch.autograd.grad(corr.sum(), teacher, allow_unused=True) == (None, None)
    # B = 2: one distance per RDM, no variance, Pearson undefined -> 0 (documented)
    s2, t2 = _tensors(2, seed=1)
    corr2 = rdm_pearson(s2, t2)
    assert torch.equal(corr2, torch.zeros(2, 3, device=DEV))


def test_degenerate_inputs_give_finite_values_and_gradients(triton_backend):
    """Duplicate samples (distance 0) and a tensor constant over the batch (all distances 0)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 10, generator=gen)
    x[3] = x[1]                                            # a zero distance
    const = torch.randn(1, 12, generator=gen).expand(6, 12).contiguous()
    student = [x.to(DEV).requires_grad_(True), const.to(DEV).requires_grad_(True)]
    teacher = [torch.randn(6, 7, generator=gen).to(DEV)]
    corr = rdm_pearson(student, teacher)
    np.testing.assert_allclose(corr[0, 0].item(), _scipy(student[:1], teacher)[0, 0], atol=1e-4)
    assert corr[0, 1].item() == 0.0
    grads = torch.autograd.grad(corr.sum(), student)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1] == 0).all()


def test_mixed_dtypes_take_one_launch_per_dtype(triton_backend):
    student, teacher = _tensors(7, seed=3)
    student16 = [student[0], student[1].detach().bfloat16().requires_grad_(True), student[2]]
    corr = rdm_pearson(student16, teacher)
    assert backend.launch_counts == {"rdm_gram_fwd": 2}
    ref = _scipy([s.float() for s in student16], teacher)
    np.testing.assert_allclose(corr.detach().cpu().numpy(), ref, atol=2e-2)
    grads = torch.autograd.grad(corr.sum(), student16)
    assert grads[1].dtype == torch.bfloat16 and backend.launch_counts["rdm_gram_bwd"] == 2


def test_large_batch_and_float64_use_the_reference_gram(triton_backend):
    student, teacher = _tensors(65, seed=4)
    corr = rdm_pearson([s.detach() for s in student], teacher)
    assert sum(backend.launch_counts.values()) == 0
    np.testing.assert_allclose(corr.cpu().numpy(), _scipy(student, teacher), atol=1e-4)
    s64, t64 = _tensors(5, seed=5, dtype=torch.float64)
    np.testing.assert_allclose(rdm_pearson(s64, t64).detach().cpu().numpy(), _scipy(s64, t64),
                               atol=1e-10)
    assert sum(backend.launch_counts.values()) == 0


def test_validation_errors():
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="at least one student and one teacher"):
        rdm_pearson([], [a])
    with pytest.raises(ValueError, match=r"teacher\[0\] has batch 5"):
        rdm_pearson([a], [torch.zeros(5, 3)])
    with pytest.raises(ValueError, match="at least 2"):
        rdm_pearson([torch.zeros(1, 3)], [torch.zeros(1, 3)])


@gpu
def test_bf16_on_gpu_at_a_thesis_like_shape():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(16, 32, 64, 64, generator=gen).cuda().bfloat16().requires_grad_(True),
               torch.randn(16, 256, 16, 16, generator=gen).cuda().bfloat16().requires_grad_(True)]
    teacher = [torch.randn(16, 32, 64, 64, generator=gen).cuda().bfloat16() + student[0].detach()]
    with use_backend("triton"):
        corr = rdm_pearson(student, teacher)
        grads = torch.autograd.grad(corr.sum(), student)
    ref = rdm_pearson_reference([s.float() for s in student], [t.float() for t in teacher])
    grads_ref = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(corr, ref, rtol=0, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
        scale = g_ref.float().abs().max().item()
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=5e-2, atol=2e-2 * scale)
