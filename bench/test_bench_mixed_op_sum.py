"""``mixed_op_sum`` (one cell edge at batch 8, rows 0 and 3 of the fabric): Triton vs the PyTorch
reference, eager and under torch.compile. Shared setup: ``bench/kernel_bench.py``.

    pytest bench/test_bench_mixed_op_sum.py bench/test_bench_copy_bandwidth.py --benchmark-group-by=group
"""
import functools

import pytest
import torch

from kernel_bench import DEV, HAS_CUDA, IMPLS, ROWS, bench, compiled, randn, skip_unless_runnable
from threempose.kernels import mixed_op_sum, mixed_op_sum_reference, use_backend


def _plain_weighted_sum(outputs, weights):
    """What one writes without the kernel (reads every output): the torch.compile baseline."""
    return functools.reduce(torch.add, [weights[k] * o for k, o in enumerate(outputs)])


_compiled_sum = compiled(_plain_weighted_sum)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["soft9-fwd", "dyn2-fwd", "soft9-fwdbwd"])
@pytest.mark.parametrize("row", [0, 3])
def test_mixed_op_sum(benchmark, impl, case, row):
    """One cell edge at batch 8: 9 candidate ops, all weighted (soft9) or Dyn-EGS 0/1 weights
    with 2 of 9 selected (dyn2; the kernel reads only those 2)."""
    skip_unless_runnable(impl)
    benchmark.group = f"mixed_op_sum row{row} {case}"
    shape = (8, *ROWS[row])
    grad = case.endswith("fwdbwd")
    outs = [randn(*shape, seed=k).requires_grad_(grad) for k in range(9)]
    if case.startswith("dyn2"):
        w = torch.zeros(9, device=DEV)
        w[[1, 4]] = 1.0
    else:
        w = torch.softmax(randn(9, seed=99), 0)
    w.requires_grad_(grad)
    size = outs[0].numel() * outs[0].element_size()
    nread = 2 if case.startswith("dyn2") else 9
    nbytes = (nread + 1) * size + (19 * size if grad else 0)   # bwd: read dy + 9 O, write 9 dO

    if impl == "triton":
        def fwd():
            with use_backend("triton"):
                return mixed_op_sum(outs, w)
    elif impl == "eager":
        def fwd():
            return mixed_op_sum_reference(outs, w)
    else:
        def fwd():
            return _compiled_sum(outs, w)

    if grad:
        gy = randn(*shape, seed=123)

        def run():
            torch.autograd.backward(fwd(), gy)
    else:
        def run():
            with torch.no_grad():
                fwd()
    bench(benchmark, run, nbytes=nbytes, rounds=5 if not HAS_CUDA else 30)
