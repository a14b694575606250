"""What the kernel benchmarks share: the device, the thesis' shapes, the timed call.

One benchmark file per kernel, named after it (``bench/test_bench_<kernel>.py``), plus
``bench/test_bench_copy_bandwidth.py``, the ``x.clone()`` baseline the bandwidth-bound kernels
are quoted against:

    pytest bench/test_bench_copy_bandwidth.py bench/test_bench_mixed_op_sum.py \
        bench/test_bench_gumbel_topk.py bench/test_bench_rdm_pearson.py \
        bench/test_bench_heatmap_moments.py --benchmark-group-by=group [--benchmark-json out.json]

Shapes (3M-Pose, C = 32 at a 512 input): 1/4-scale fabric maps 32x128x128, 64x64x64,
128x32x32, 256x16x16 (rows 0-3); 37 student cells (10/10/9/8 per row).

Each benchmark's ``extra_info`` holds ``device``, and for the bandwidth-bound kernels
``bytes`` (the minimum traffic: each input read once, each output written once) and ``GB_s``
(bytes / median time). "% of copy bandwidth" = a case's ``GB_s`` / the ``copy`` case's ``GB_s``
on the same device, in the same run. Every GPU call is followed by ``torch.cuda.synchronize()``
inside the timed region.

Triton cases need a CUDA GPU and skip with a reason otherwise; torch.compile cases are
measured on the GPU only (where they compete with the kernels); the eager reference and the
copy baseline run anywhere. Never compare timings across devices.
"""
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DEVICE_NAME = (torch.cuda.get_device_name() if HAS_CUDA
               else f"cpu ({platform.processor() or platform.machine()})")
IMPLS = ["triton", "eager", "compile"]

ROWS = {0: (32, 128, 128), 1: (64, 64, 64), 2: (128, 32, 32), 3: (256, 16, 16)}
CELLS_PER_ROW = {0: 10, 1: 10, 2: 9, 3: 8}          # 37 cells (thesis Table A.1)


def compiled(fn):
    """``torch.compile(fn)``, or None on a torch without it (its cases skip on a CPU anyway)."""
    return torch.compile(fn) if hasattr(torch, "compile") else None


def skip_unless_runnable(impl: str) -> None:
    """Skip, with the reason, an ``impl`` this machine does not time (see the module docstring)."""
    if impl == "triton" and not HAS_CUDA:
        pytest.skip("Triton kernels are benchmarked on a CUDA GPU only (the CPU interpreter "
                    "is a correctness tool, not a timing)")
    if impl == "compile" and not HAS_CUDA:
        pytest.skip("torch.compile baselines are measured on the GPU, where they compete with "
                    "the Triton kernels; on a CPU the reference runs eager only")


def bench(benchmark, fn, nbytes=None, rounds=20, warmup=3):
    """Time ``fn()`` (synchronised on a GPU) and record the device and, given ``nbytes``, GB/s."""
    def call():
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()

    if HAS_CUDA:
        torch.cuda.synchronize()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["device"] = DEVICE_NAME
    if nbytes and benchmark.stats is not None:      # stats are None under --benchmark-disable
        benchmark.extra_info["bytes"] = int(nbytes)
        benchmark.extra_info["GB_s"] = nbytes / benchmark.stats.stats.median / 1e9


def randn(*shape, seed=0, dtype=torch.float32):
    """A seeded standard-normal tensor on :data:`DEV`."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEV, dtype=dtype)
