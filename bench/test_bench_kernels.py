"""Kernel microbenchmarks at the thesis' shapes: Triton vs the PyTorch reference (eager and
under torch.compile), plus an ``x.clone()`` copy-bandwidth baseline.

    pytest bench/test_bench_kernels.py --benchmark-group-by=group [--benchmark-json out.json]

Shapes (3M-Pose, C = 32 at a 512 input): 1/4-scale fabric maps 32x128x128, 64x64x64,
128x32x32, 256x16x16 (rows 0-3), batch 8 for the mixed-op sums and 16 for the teacher RDMs
(37 student cells: 10/10/9/8 per row, 4 teacher layers); Gumbel rows of all 37 cells in one
call (alpha: 111 edges x 9 ops, beta: 37 cells x 3 inputs, m_alpha: 111 x 2 states,
m_beta: 37 x 3 states, padded to 9 columns with -inf); heatmaps 17 x 128 x 128 at batch 1
(dynamic inference) and 16.

Each benchmark's ``extra_info`` holds ``device``, and for the bandwidth-bound kernels
``bytes`` (the minimum traffic: each input read once, each output written once) and ``GB_s``
(bytes / median time). "% of copy bandwidth" = a case's ``GB_s`` / the ``copy`` case's ``GB_s``
on the same device. The ``*_per_cell_loop`` case is the eager baseline the Gumbel target is
measured against. Every GPU call is followed by ``torch.cuda.synchronize()`` inside the timed
region.

Triton cases need a CUDA GPU and skip with a reason otherwise; torch.compile cases are
measured on the GPU only (where they compete with the kernels); the eager reference and the
copy baseline run anywhere. Never compare timings across devices.
"""
import functools
import platform

import pytest
import torch

from threempose.kernels import (gumbel_topk, gumbel_topk_reference, heatmap_moments,
                                heatmap_moments_reference, mixed_op_sum, mixed_op_sum_reference,
                                rdm_pearson, rdm_pearson_reference, use_backend)

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DEVICE_NAME = (torch.cuda.get_device_name() if HAS_CUDA
               else f"cpu ({platform.processor() or platform.machine()})")
IMPLS = ["triton", "eager", "compile"]

ROWS = {0: (32, 128, 128), 1: (64, 64, 64), 2: (128, 32, 32), 3: (256, 16, 16)}
CELLS_PER_ROW = {0: 10, 1: 10, 2: 9, 3: 8}          # 37 cells (thesis Table A.1)


def _skip_unless_runnable(impl: str) -> None:
    if impl == "triton" and not HAS_CUDA:
        pytest.skip("Triton kernels are benchmarked on a CUDA GPU only (the CPU interpreter "
                    "is a correctness tool, not a timing)")
    if impl == "compile" and not HAS_CUDA:
        pytest.skip("torch.compile baselines are measured on the GPU, where they compete with "
                    "the Triton kernels; on a CPU the reference runs eager only")


def _bench(benchmark, fn, nbytes=None, rounds=20, warmup=3):
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


def _randn(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEV, dtype=dtype)


# --------------------------------------------------------------------------- #
# copy bandwidth baseline
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(8, 32, 128, 128), (16, 17, 128, 128)],
                         ids=["fabric-row0-b8", "heatmaps-b16"])
def test_copy(benchmark, shape):
    benchmark.group = "copy"
    x = _randn(*shape)
    _bench(benchmark, x.clone, nbytes=2 * x.numel() * x.element_size(),
           rounds=10 if not HAS_CUDA else 50)


# --------------------------------------------------------------------------- #
# mixed_op_sum
# --------------------------------------------------------------------------- #
def _plain_weighted_sum(outputs, weights):
    """What one writes without the kernel (reads every output): the torch.compile baseline."""
    return functools.reduce(torch.add, [weights[k] * o for k, o in enumerate(outputs)])


_compiled_sum = torch.compile(_plain_weighted_sum) if hasattr(torch, "compile") else None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["soft9-fwd", "dyn2-fwd", "soft9-fwdbwd"])
@pytest.mark.parametrize("row", [0, 3])
def test_mixed_op_sum(benchmark, impl, case, row):
    """One cell edge at batch 8: 9 candidate ops, all weighted (soft9) or Dyn-EGS 0/1 weights
    with 2 of 9 selected (dyn2; the kernel reads only those 2)."""
    _skip_unless_runnable(impl)
    benchmark.group = f"mixed_op_sum row{row} {case}"
    shape = (8, *ROWS[row])
    grad = case.endswith("fwdbwd")
    outs = [_randn(*shape, seed=k).requires_grad_(grad) for k in range(9)]
    if case.startswith("dyn2"):
        w = torch.zeros(9, device=DEV)
        w[[1, 4]] = 1.0
    else:
        w = torch.softmax(_randn(9, seed=99), 0)
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
        gy = _randn(*shape, seed=123)

        def run():
            torch.autograd.backward(fwd(), gy)
    else:
        def run():
            with torch.no_grad():
                fwd()
    _bench(benchmark, run, nbytes=nbytes, rounds=5 if not HAS_CUDA else 30)


# --------------------------------------------------------------------------- #
# gumbel_topk: every cell's alpha / beta / m rows
# --------------------------------------------------------------------------- #
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


_compiled_gumbel_reference = (torch.compile(gumbel_topk_reference)
                              if hasattr(torch, "compile") else None)


@pytest.mark.parametrize("impl", IMPLS + ["eager_per_cell_loop"])
def test_gumbel_topk_all_cells(benchmark, impl):
    """Forward + backward of one architecture sample (tau = 1)."""
    _skip_unless_runnable(impl)
    benchmark.group = "gumbel_topk all 37 cells fwd+bwd"
    logits, k, groups = _arch_rows()
    logits.requires_grad_(True)
    gy = _randn(*logits.shape, seed=5)

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
    _bench(benchmark, run, rounds=10 if not HAS_CUDA else 100, warmup=5)


# --------------------------------------------------------------------------- #
# rdm_pearson: 37 student cells x 4 teacher layers at batch 16
# --------------------------------------------------------------------------- #
def _rdm_inputs(batch=16):
    student = [_randn(batch, *ROWS[r], seed=100 * r + i)
               for r, n in CELLS_PER_ROW.items() for i in range(n)]
    teacher = [_randn(batch, *ROWS[r], seed=7000 + r) for r in ROWS]
    return student, teacher


_compiled_rdm_reference = (torch.compile(rdm_pearson_reference)
                           if hasattr(torch, "compile") else None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_rdm_pearson(benchmark, impl, grad):
    _skip_unless_runnable(impl)
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
    _bench(benchmark, run, nbytes=nbytes, rounds=3 if not HAS_CUDA else 20, warmup=1)


# --------------------------------------------------------------------------- #
# heatmap_moments
# --------------------------------------------------------------------------- #
_compiled_moments_reference = (torch.compile(heatmap_moments_reference)
                               if hasattr(torch, "compile") else None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 16])
def test_heatmap_moments(benchmark, impl, batch):
    _skip_unless_runnable(impl)
    benchmark.group = f"heatmap_moments {batch}x17x128x128"
    h = torch.rand(batch, 17, 128, 128, device=DEV)
    fn = {"triton": heatmap_moments, "eager": heatmap_moments_reference,
          "compile": _compiled_moments_reference}[impl]

    def run():
        with torch.no_grad(), use_backend("triton" if impl == "triton" else "reference"):
            fn(h)
    _bench(benchmark, run, nbytes=h.numel() * h.element_size(),
           rounds=10 if not HAS_CUDA else 50)

