"""``rdm_pearson``: the teacher RDMs of 37 student cells x 4 teacher layers at batch 16, Triton vs
the PyTorch reference (eager, torch.compile). Shared setup: ``bench/kernel_bench.py``.

    pytest bench/test_bench_rdm_pearson.py bench/test_bench_copy_bandwidth.py --benchmark-group-by=group
"""
import pytest
import torch

from kernel_bench import CELLS_PER_ROW, HAS_CUDA, IMPLS, ROWS, bench, compiled, randn, skip_unless_runnable
from threempose.kernels import rdm_pearson, rdm_pearson_reference, use_backend


def _rdm_inputs(batch=16):
    student = [randn(batch, *ROWS[r], seed=100 * r + i)
               for r, n in CELLS_PER_ROW.items() for i in range(n)]
    teacher = [randn(batch, *ROWS[r], seed=7000 + r) for r in ROWS]
    return student, teacher


_compiled_rdm_reference = compiled(rdm_pearson_reference)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_rdm_pearson(benchmark, impl, grad):
    skip_unless_runnable(impl)
    benchmark.group = f"rdm_pearson 37x4 b16 {'fwd+bwd' if grad else 'fwd'}"
    student, teacher = _rdm_inputs()
    for s in student:
        s.requires_grad_(grad)
    nbytes = sum(x.numel() * x.element_size() for x in student + teacher)
    if grad:
        nbytes += 2 * sum(s.numel() * s.element_size() for s in student)   # re-read + write
    fn = {"triton": rdm_pearson, "eager": rdm_pearson_reference,
          "compile": _compiled_rdm_reference}[impl]

    def fwd():
        with use_backend("triton" if impl == "triton" else "reference"):
            return fn(student, teacher)

    if grad:
        def run():
            loss = 1.0 - fwd().max(dim=1).values.mean()
            loss.backward()
            for s in student:
                s.grad = None
    else:
        def run():
            with torch.no_grad():
                fwd()
    bench(benchmark, run, nbytes=nbytes, rounds=3 if not HAS_CUDA else 20, warmup=1)
