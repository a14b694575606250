"""The ``x.clone()`` copy-bandwidth baseline the bandwidth-bound kernel benchmarks are quoted
against ("% of copy bandwidth"; run it in the same session, see ``bench/kernel_bench.py``).

    pytest bench/test_bench_copy_bandwidth.py
"""
import pytest

from kernel_bench import HAS_CUDA, bench, randn


@pytest.mark.parametrize("shape", [(8, 32, 128, 128), (16, 17, 128, 128)],
                         ids=["fabric-row0-b8", "heatmaps-b16"])
def test_copy(benchmark, shape):
    benchmark.group = "copy"
    x = randn(*shape)
    bench(benchmark, x.clone, nbytes=2 * x.numel() * x.element_size(),
           rounds=10 if not HAS_CUDA else 50)
