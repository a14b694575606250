"""``gumbel_topk`` on the Gumbel rows of all 37 cells in one call (alpha: 111 edges x 9 ops,
beta: 37 cells x 3 inputs, m_alpha: 111 x 2 states, m_beta: 37 x 3 states, padded to 9 columns
with -inf): Triton vs the PyTorch reference (eager, torch.compile) and the eager per-cell loop
the Gumbel target is measured against. Shared setup: ``bench/kernel_bench.py``.

    pytest bench/test_bench_gumbel_topk.py --benchmark-group-by=group
"""
import pytest
import torch

from kernel_bench import DEV, HAS_CUDA, IMPLS, bench, compiled, randn, skip_unless_runnable
from threempose.kernels import gumbel_topk, gumbel_topk_reference, use_backend


def _arch_rows():
    """Logits [296, 9] (-inf padded) and k [296] of one Dyn-EGS sample of all 37 cells."""
    gen = torch.Generator().manual_seed(0)
    groups = [(111, 9, 2), (37, 3, 3), (111, 2, 1), (37, 3, 1)]   # rows, width, max k
    logits, ks = [], []
    for rows, width, kmax in groups:
        z = torch.full((rows, 9), float("-inf"))
        z[:, :width] = 1e-3 * torch.randn(rows, width, generator=gen)
        logits.append(z)
        ks.append(torch.randint(1, kmax + 1, (rows,), generator=gen))
    return torch.cat(logits).to(DEV), torch.cat(ks).to(DEV), groups


def _per_cell_loop(logits, k, groups, tau):
    """The eager baseline: per cell and per parameter group, torch Gumbel-softmax top-k with a
    straight-through estimator (what a supernet does without the batched kernel)."""
    outs, start = [], 0
    for rows, width, _ in groups:
        per_cell = 3 if rows == 111 else 1
        for r0 in range(start, start + rows, per_cell):
            z = logits[r0:r0 + per_cell, :width]
            kk = k[r0:r0 + per_cell]
            g = -torch.log(-torch.log(torch.rand_like(z).clamp_(1e-10, 1 - 1e-7)))
            y = torch.softmax((z + g) / tau, dim=1)
            order = torch.argsort(z + g, dim=1, descending=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(width, device=z.device).expand_as(order).contiguous())
            hard = (rank < kk[:, None]).to(y.dtype)
            outs.append(hard - y.detach() + y)
        start += rows
    return outs


_compiled_gumbel_reference = compiled(gumbel_topk_reference)


@pytest.mark.parametrize("impl", IMPLS + ["eager_per_cell_loop"])
def test_gumbel_topk_all_cells(benchmark, impl):
    """Forward + backward of one architecture sample (tau = 1)."""
    skip_unless_runnable(impl)
    benchmark.group = "gumbel_topk all 37 cells fwd+bwd"
    logits, k, groups = _arch_rows()
    logits.requires_grad_(True)
    gy = randn(*logits.shape, seed=5)

    if impl == "eager_per_cell_loop":
        def run():
            outs = _per_cell_loop(logits, k, groups, 1.0)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    else:
        fn = {"triton": gumbel_topk, "eager": gumbel_topk_reference,
              "compile": _compiled_gumbel_reference}[impl]

        def run():
            with use_backend("triton" if impl == "triton" else "reference"):
                mask = fn(logits, k, 1.0, 1234)   # the seed does not change the cost
            torch.autograd.backward(mask, gy)
    bench(benchmark, run, rounds=10 if not HAS_CUDA else 100, warmup=5)
