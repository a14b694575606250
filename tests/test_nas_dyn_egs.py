"""Dyn-EGS sampling against an independent reconstruction from the kernel's Gumbel noise."""
import pytest
import torch

from threempose.kernels import gumbel_noise
from threempose.nas.dyn_egs import ArchParameters, gumbel_tau

# 4 cells: all neighbours exist / above missing (copies parallel) / only above exists / only parallel
SLOTS = [[0, 1, 2], [1, 1, 2], [0, 0, 0], [1, 1, 1]]
E, K, RA, RB = 3, 9, 2, 3


def make_arch(seed: int = 0) -> ArchParameters:
    arch = ArchParameters(SLOTS, E, K, RA, RB)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (arch.alpha, arch.beta, arch.m_alpha, arch.m_beta):
            p.copy_(torch.randn(p.shape, generator=g))
    return arch


def reference_choice(arch: ArchParameters, seed: int):
    """Ops per edge and real neighbours per cell, recomputed by hand: state i = argmax(m + g),
    then the top i+1 of (logits + g') with the kernel's noise for seeds 2s and 2s+1."""
    n = arch.beta.shape[0]
    rows_logits = [list(r) for r in arch.alpha.detach().reshape(n * E, K)] + \
                  [list(r) + [float("-inf")] * (K - 3) for r in arch.beta.detach()]
    rows_m = [list(r) + [float("-inf")] for r in arch.m_alpha.detach().reshape(n * E, RA)] + \
             [list(r) for r in arch.m_beta.detach()]
    g_state = gumbel_noise(len(rows_m), 3, 2 * seed)
    g_sel = gumbel_noise(len(rows_logits), K, 2 * seed + 1)
    chosen = []
    for r, (logits, m) in enumerate(zip(rows_logits, rows_m)):
        state = max(range(3), key=lambda i: float(m[i] + g_state[r, i]))
        scores = [float(logits[c] + g_sel[r, c]) for c in range(K)]
        chosen.append(sorted(sorted(range(K), key=lambda c: -scores[c])[:state + 1]))
    ops = [[chosen[c * E + e] for e in range(E)] for c in range(n)]
    paths = [sorted({SLOTS[c][s] for s in chosen[n * E + c]}) for c in range(n)]
    return ops, paths


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_dyn_egs_selects_top_i_plus_1_of_perturbed_logits(seed):
    arch = make_arch(seed)
    sample = arch.sample("dyn_egs", tau=1.0, seed=seed)
    ops, paths = reference_choice(arch, seed)
    assert sample.ops == ops
    assert sample.paths == paths
    # forward values are exactly 0/1, and they agree with the index lists
    for c in range(len(SLOTS)):
        for e in range(E):
            assert sample.op_weights[c, e].tolist() == [float(k in ops[c][e]) for k in range(K)]
        assert sample.path_weights[c].tolist() == [float(p in paths[c]) for p in range(3)]


def test_counts_follow_m_and_copies_are_computed_once():
    arch = make_arch()
    with torch.no_grad():
        arch.m_alpha.copy_(torch.tensor([0.0, 50.0]))     # state 1: two ops per edge
        arch.m_beta.copy_(torch.tensor([0.0, 0.0, 50.0]))  # state 2: all three slots
    sample = arch.sample("dyn_egs", tau=0.5, seed=3)
    assert all(len(edge) == 2 for cell in sample.ops for edge in cell)
    assert sample.paths == [[0, 1, 2], [1, 2], [0], [1]]
    # a neighbour chosen through several slots has weight exactly 1 (computed once)
    assert sample.path_weights.tolist() == [[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]]


def test_gradients_reach_alpha_beta_and_both_m():
    arch = make_arch()
    sample = arch.sample("dyn_egs", tau=1.0, seed=7)
    g = torch.Generator().manual_seed(1)
    loss = ((sample.op_weights * torch.randn(sample.op_weights.shape, generator=g)).sum()
            + (sample.path_weights * torch.randn(sample.path_weights.shape, generator=g)).sum())
    loss.backward()
    for p in (arch.alpha, arch.beta, arch.m_alpha, arch.m_beta):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_same_seed_same_sample_other_seed_other_sample():
    arch = make_arch()
    a, b = arch.sample("dyn_egs", 1.0, seed=5), arch.sample("dyn_egs", 1.0, seed=5)
    assert (a.ops, a.paths) == (b.ops, b.paths)
    torch.testing.assert_close(a.op_weights, b.op_weights)
    others = [arch.sample("dyn_egs", 1.0, seed=s) for s in range(6, 10)]
    assert any((o.ops, o.paths) != (a.ops, a.paths) for o in others)


def test_argmax_is_noise_free_top_k_with_k_from_argmax_m():
    arch = make_arch()
    sample = arch.sample("argmax", tau=1.0)
    n = len(SLOTS)
    for c in range(n):
        for e in range(E):
            k = int(arch.m_alpha[c, e].argmax()) + 1
            assert sample.ops[c][e] == sorted(arch.alpha[c, e].topk(k).indices.tolist())
        k = int(arch.m_beta[c].argmax()) + 1
        assert sample.paths[c] == sorted({SLOTS[c][s] for s in arch.beta[c].topk(k).indices.tolist()})
    sample.op_weights.sum().backward()
    assert arch.alpha.grad.abs().sum() > 0 and arch.m_alpha.grad.abs().sum() > 0


def test_dense_weights_every_op_by_softmax():
    arch = make_arch()
    sample = arch.sample("dense", tau=1.0)
    torch.testing.assert_close(sample.op_weights, arch.alpha.softmax(-1))
    slot_w = arch.beta.softmax(-1)
    # cell 1's "above" slot copies "parallel": parallel gets both slots' weight
    expected = torch.stack([torch.tensor(0.0), slot_w[1, 0] + slot_w[1, 1], slot_w[1, 2]])
    torch.testing.assert_close(sample.path_weights[1], expected)
    assert all(len(edge) == K for cell in sample.ops for edge in cell)


def test_dyn_egs_needs_a_seed_and_a_known_mode():
    arch = make_arch()
    with pytest.raises(ValueError, match="seed"):
        arch.sample("dyn_egs", 1.0, seed=None)
    with pytest.raises(ValueError, match="unknown sampling mode"):
        arch.sample("random", 1.0, seed=0)


def test_gumbel_tau_is_linear_and_clamped():
    assert gumbel_tau(0.0) == 10.0
    assert gumbel_tau(1.0) == pytest.approx(0.001)
    assert gumbel_tau(0.5) == pytest.approx((10.0 + 0.001) / 2)
    assert gumbel_tau(2.0) == pytest.approx(0.001) and gumbel_tau(-1.0) == 10.0
    assert gumbel_tau(0.25, start=4.0, end=2.0) == pytest.approx(3.5)


def _ensemble_case(seed: int, tau: float):
    """One cell (only a parallel input), one edge, K = 3 ops, m_alpha forced to state 1 (two draws)."""
    arch = ArchParameters([[1, 1, 1]], 1, 3, 2, 1, dyn_egs_sampling="ensemble")
    with torch.no_grad():
        arch.alpha.copy_(torch.tensor([[[0.3, -0.2, 0.1]]]))
        arch.m_alpha.copy_(torch.tensor([[[0.0, 60.0]]]))
    return arch


@pytest.mark.parametrize("seed", [0, 3, 11, 2024])
def test_ensemble_sampling_ors_i_plus_1_one_hot_draws_forward_and_gradient(seed):
    """Hand-computed from the kernel's noise: the logits rows are [alpha row, beta row] (R = 2),
    stacked twice; draw k of the alpha row reads noise row 2k. The forward keeps the union of the
    two draws' argmaxes (once each); the gradient w.r.t. alpha of sum(w * op_weights) is the sum
    over the two draws of softmax's VJP, (1/tau) p_k * (w - <p_k, w>), p_k = softmax((alpha + g_k) / tau)."""
    tau = 0.7
    arch = _ensemble_case(seed, tau)
    sample = arch.sample("dyn_egs", tau=tau, seed=seed)
    g = gumbel_noise(4, 3, 2 * seed + 1)
    alpha = arch.alpha.detach()[0, 0]
    draws = [int(torch.argmax(alpha + g[2 * k])) for k in range(2)]
    assert sample.ops == [[sorted(set(draws))]]
    assert sample.op_weights.detach()[0, 0].tolist() == [float(j in draws) for j in range(3)]
    w = torch.tensor([1.0, -2.0, 0.5])
    (sample.op_weights[0, 0] * w).sum().backward()
    expected = torch.zeros(3)
    for k in range(2):
        p = ((alpha + g[2 * k]) / tau).softmax(0)
        expected += p * (w - (p * w).sum()) / tau
    torch.testing.assert_close(arch.alpha.grad[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_ensemble_draw_0_is_topk_top_1_and_duplicates_keep_one_op():
    """State 0 of both readings is the same one-hot draw; where the ensemble's two draws agree it
    keeps one op while topk keeps two (found by scanning seeds)."""
    arch = make_arch(5)
    with torch.no_grad():
        arch.m_alpha.copy_(torch.tensor([60.0, 0.0]))       # state 0 everywhere
        arch.m_beta.copy_(torch.tensor([60.0, 0.0, 0.0]))
    topk = arch.sample("dyn_egs", tau=1.0, seed=9)
    arch.dyn_egs_sampling = "ensemble"
    assert arch.sample("dyn_egs", tau=1.0, seed=9).ops == topk.ops
    case = _ensemble_case(0, 1.0)
    counts = {len(case.sample("dyn_egs", tau=1.0, seed=s).ops[0][0]) for s in range(40)}
    assert counts == {1, 2}
    case.dyn_egs_sampling = "topk"
    assert {len(case.sample("dyn_egs", tau=1.0, seed=s).ops[0][0]) for s in range(40)} == {2}
    with pytest.raises(ValueError, match="dyn_egs_sampling"):
        ArchParameters([[1, 1, 1]], 1, 3, 2, 1, dyn_egs_sampling="sum")


def test_model_dyn_egs_sampling_setting_reaches_the_supernet_and_pnfs_fabrics():
    from threempose.config import ModelConfig, load_config
    from threempose.nas.supernet import Supernet
    from threempose.pnfs.model import PnfsNet
    from pathlib import Path
    small = ModelConfig(rows=2, layers=2, channels=4, hidden=1, eels=[], fuse_split=False, stem_blocks=0,
                        ops=["identity", "conv"], dyn_egs_sampling="ensemble")
    assert Supernet(small).arch.dyn_egs_sampling == "ensemble"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pnfs-small.json",
                      overrides={"model": {"dyn_egs_sampling": "ensemble", "sampling": "dyn_egs"}})
    assert {f.arch.dyn_egs_sampling for f in PnfsNet(cfg).searchable_fabrics()} == {"ensemble"}
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "search.json").model.dyn_egs_sampling == "topk"
