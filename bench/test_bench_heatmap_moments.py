"""``heatmap_moments`` on 17 x 128 x 128 heatmaps at batch 1 (dynamic inference) and 16: Triton vs
the PyTorch reference (eager, torch.compile). Shared setup: ``bench/kernel_bench.py``.

    pytest bench/test_bench_heatmap_moments.py bench/test_bench_copy_bandwidth.py --benchmark-group-by=group
"""
import pytest
import torch

from kernel_bench import DEV, HAS_CUDA, IMPLS, bench, compiled, skip_unless_runnable
from threempose.kernels import heatmap_moments, heatmap_moments_reference, use_backend


_compiled_moments_reference = compiled(heatmap_moments_reference)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 16])
def test_heatmap_moments(benchmark, impl, batch):
    skip_unless_runnable(impl)
    benchmark.group = f"heatmap_moments {batch}x17x128x128"
    h = torch.rand(batch, 17, 128, 128, device=DEV)
    fn = {"triton": heatmap_moments, "eager": heatmap_moments_reference,
          "compile": _compiled_moments_reference}[impl]

    def run():
        with torch.no_grad(), use_backend("triton" if impl == "triton" else "reference"):
            fn(h)
    bench(benchmark, run, nbytes=h.numel() * h.element_size(),
           rounds=10 if not HAS_CUDA else 50)
