"""gumbel_topk: Philox noise, Triton (interpreter on CPU) == reference masks, statistics, ST grads.

Tolerances: Philox words and uniforms must be bit-identical; Gumbel noise and masks identical
(see the module docstring for the ~1e-9 caveat, never hit at these sizes); soft probabilities
Triton vs reference 1e-6; straight-through gradient vs torch.func.vjp of the softmax 1e-5.
Statistics: 4-sigma binomial bounds per category (and a chi-square p > 1e-3) on 20000 draws.
"""
import importlib
import math

import numpy as np
import pytest
import scipy.stats
import torch
from devices import DEV, gpu

from threempose.kernels import (backend, gumbel_noise, gumbel_noise_reference, gumbel_topk,
                                gumbel_topk_reference, use_backend)

gmod = importlib.import_module("threempose.kernels.gumbel_topk")


# Random123 tests/kat_vectors (DEShawResearch/random123): counter, key, output words (hex).
KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000",
     "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff",
     "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0",
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_torch_philox_matches_random123_known_answers(ctr, key, out):
    c = [torch.tensor([int(h, 16)], dtype=torch.int64) for h in ctr.split()]
    k = [int(h, 16) for h in key.split()]
    got = gmod.philox4x32(*c, *k)
    assert [int(v) for v in got] == [int(h, 16) for h in out.split()]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**62 + 99])
def test_triton_noise_is_bit_identical_to_reference(triton_backend, seed):
    g_tri = gumbel_noise(37, 9, seed, device=DEV)
    g_ref = gumbel_noise_reference(37, 9, seed, device=DEV)
    assert torch.equal(g_tri, g_ref)
    assert backend.launch_counts == {"gumbel_noise": 1}


def test_noise_depends_only_on_seed_row_col_and_is_gumbel():
    big = gumbel_noise_reference(50, 9, seed=4)
    torch.testing.assert_close(gumbel_noise_reference(20, 3, seed=4), big[:20, :3], rtol=0, atol=0)
    assert not torch.equal(gumbel_noise_reference(50, 9, seed=5), big)
    sample = gumbel_noise_reference(200, 100, seed=9).double().flatten().numpy()
    # standard Gumbel (location 0, scale 1): Kolmogorov-Smirnov on 20000 draws
    assert scipy.stats.kstest(sample, scipy.stats.gumbel_r.cdf).pvalue > 1e-3
    assert abs(sample.mean() - np.euler_gamma) < 4 * (math.pi / math.sqrt(6)) / math.sqrt(20000)


@pytest.mark.parametrize("K", range(1, 10))
def test_triton_masks_equal_reference_with_exact_k_ones(triton_backend, K):
    N = 45                                           # not a multiple of the 32-row block
    gen = torch.Generator().manual_seed(K)
    logits = (2 * torch.randn(N, K, generator=gen)).to(DEV)
    k = torch.randint(0, K + 1, (N,), generator=gen).to(DEV)
    k[0], k[1] = 0, K                                # both ends always present
    for seed in (3, 2**40 + 1):
        mask, soft = gumbel_topk(logits, k, 0.5, seed, return_soft=True)
        mask_ref, soft_ref = gumbel_topk_reference(logits, k, 0.5, seed, return_soft=True)
        assert torch.equal(mask, mask_ref)
        assert torch.equal(mask.sum(1), k.to(mask.dtype))
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(soft, soft_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(soft.sum(1), torch.ones(N, device=DEV))
        # the selected entries are the k largest perturbed scores
        s = logits.float() + gumbel_noise_reference(N, K, seed, DEV)
        for r in range(N):
            if 0 < k[r] < K:
                assert s[r][mask[r] == 1].min() > s[r][mask[r] == 0].max()
    assert backend.launch_counts == {"gumbel_topk_fwd": 2}     # all rows, one launch per call


def test_ties_go_to_the_lower_column_and_minus_inf_is_never_picked(triton_backend):
    # equal logits + equal noise is impossible to arrange, so test the tie rule on the scores:
    # huge equal logits swamp the noise in float32 (1e9 + g rounds to 1e9 exactly).
    logits = torch.tensor([[1e9, 1e9, 1e9, 1e9], [0.0, float("-inf"), 1.0, float("-inf")]],
                          device=DEV)
    k = torch.tensor([2, 2], device=DEV)
    for fn in (gumbel_topk, gumbel_topk_reference):
        mask = fn(logits, k, 1.0, 0)
        assert mask.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]


def test_straight_through_gradient_is_the_softmax_vjp(triton_backend):
    N, K, tau, seed = 37, 5, 0.7, 21
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, K, generator=gen).to(DEV).requires_grad_(True)
    k = torch.randint(0, K + 1, (N,), generator=gen).to(DEV)
    g_mask = torch.randn(N, K, generator=gen).to(DEV)
    g_soft = torch.randn(N, K, generator=gen).to(DEV)
    noise = gumbel_noise_reference(N, K, seed, DEV)
    _, vjp = torch.func.vjp(lambda z: torch.softmax((z + noise) / tau, dim=1), logits.detach())
    (expected,) = vjp(g_mask + g_soft)
    for fn in (gumbel_topk, gumbel_topk_reference):
        mask, soft = fn(logits, k, tau, seed, return_soft=True)
        (grad,) = torch.autograd.grad([mask, soft], [logits], [g_mask, g_soft])
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
    assert backend.launch_counts["gumbel_topk_bwd"] == 1


def _frequencies(logits_row, k, n_rows, seeds):
    """Selection frequencies of each column over n_rows * len(seeds) independent draws."""
    logits = logits_row.expand(n_rows, -1).contiguous()
    counts = torch.zeros(logits.shape[1], dtype=torch.float64)
    for seed in seeds:
        counts += gumbel_topk_reference(logits, k, 1.0, seed).double().sum(0)
    return (counts / (n_rows * len(seeds))).numpy(), n_rows * len(seeds)


def test_top1_frequencies_match_softmax():
    """Gumbel-max: P(column i is the top-1) = softmax(logits)_i, for any tau."""
    z = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    p = torch.softmax(z.double(), 0).numpy()
    freq, n = _frequencies(z, 1, 2000, seeds=range(10))
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)), (freq, p)
    assert scipy.stats.chisquare(freq * n, p * n).pvalue > 1e-3


def test_top2_inclusion_matches_sampling_without_replacement():
    """Gumbel top-2 = Plackett-Luce: P(i in top 2) = p_i + sum_{j != i} p_j p_i / (1 - p_j)."""
    z = torch.tensor([0.8, 0.3, 0.0, -1.0])
    p = torch.softmax(z.double(), 0).numpy()
    incl = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i)
                     for i in range(4)])
    freq, n = _frequencies(z, 2, 2000, seeds=range(100, 110))
    assert abs(freq.sum() - 2.0) < 1e-12
    assert np.all(np.abs(freq - incl) <= 4 * np.sqrt(incl * (1 - incl) / n)), (freq, incl)


def test_validation_errors():
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        gumbel_topk(torch.zeros(4), 1, 1.0, 0)
    with pytest.raises(ValueError, match=r"shape \[N\] = \[3\]"):
        gumbel_topk(z, torch.ones(2, dtype=torch.int64), 1.0, 0)
    with pytest.raises(ValueError, match="tau"):
        gumbel_topk(z, 1, 0.0, 0)
    with pytest.raises(ValueError, match="seed"):
        gumbel_topk(z, 1, 1.0, -1)


@gpu
def test_bf16_logits_on_gpu():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(37 * 3, 9, generator=gen).cuda().bfloat16().requires_grad_(True)
    k = torch.randint(0, 10, (37 * 3,), generator=gen).cuda()
    with use_backend("triton"):
        mask, soft = gumbel_topk(logits, k, 2.0, 77, return_soft=True)
        (g,) = torch.autograd.grad(soft.sum() * 0 + (mask * 1.0).sum(), [logits])
    mask_ref, soft_ref = gumbel_topk_reference(logits, k, 2.0, 77, return_soft=True)
    (g_ref,) = torch.autograd.grad(soft_ref.sum() * 0 + (mask_ref * 1.0).sum(), [logits])
    assert mask.dtype == torch.bfloat16 and torch.equal(mask, mask_ref)
    torch.testing.assert_close(soft, soft_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1.6e-2, atol=1e-3)
