"""A whole search step of the thesis' supernet: kernels backend ``auto`` vs ``reference``.

    pytest bench/test_bench_search_step.py [--benchmark-json out.json]

One step is what a search's weight step does (thesis §3.4, §4.1): a Dyn-EGS sample of the
4-row, 10-layer, C = 32 supernet (9 ops per edge, EELs at layers 4 and 7, stem with 4
bottlenecks), its forward, the loss on every exit (heatmap, associative embedding, FLOPs, and
the RDM teacher term against fixed teacher features of HigherHRNet-W32's shapes - the teacher's
own forward is not timed, no kernel touches it) and the backward into weights and alpha/beta/m.
Every case sees the same sequence of sampled architectures (seed = round index).

Sizes: on a GPU the thesis' 512 x 512 input at batch 8; on a CPU a modest 128 x 128 at batch 4
(the RDM term needs a batch of at least 3).

``auto`` sends CUDA tensors to the Triton kernels (mixed-op sums, Gumbel top-k, RDM Pearson)
and CPU tensors to the PyTorch reference, so on a CPU machine ``auto`` *is* ``reference``: the
``auto`` case and the comparison skip with that reason and only ``reference`` is timed.
Peak memory is ``torch.cuda.max_memory_allocated`` of one step (GPU only).

On a GPU the comparison also checks that ``auto`` really ran Triton: every kernel of a search
step (:data:`STEP_KERNELS`) launched at least once per step, none fell back to the reference
(no fallback warning), and ``reference`` launched nothing.

Each benchmark's ``extra_info`` holds ``device``, ``backend``, ``input_size``, ``batch``,
``images_per_s`` (batch / median step time) and, on a GPU, ``peak_memory_MiB``; the GPU-only
comparison records ``speedup`` (reference median / auto median) and ``memory_ratio`` (auto peak /
reference peak). Never compare timings across devices.
"""
import platform
import time

import pytest
import torch

from threempose.config import LossConfig, ModelConfig
from threempose.data.targets import make_targets
from threempose.kernels import backend as kernels_backend
from threempose.kernels import use_backend
from threempose.training.losses import PoseLoss
from threempose.models.higherhrnet import HigherHRNet
from threempose.nas.supernet import Supernet

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DEVICE_NAME = (torch.cuda.get_device_name() if HAS_CUDA
               else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
SIZE, BATCH = (512, 8) if HAS_CUDA else (128, 4)
ROUNDS, WARMUP = 10, 2
PEOPLE = 3
STEP_KERNELS = ("mixed_op_sum_fwd", "mixed_op_sum_bwd", "gumbel_topk_fwd", "gumbel_topk_bwd",
                "rdm_gram_fwd", "rdm_gram_bwd")
"""The Triton kernels one search step launches (names of :data:`threempose.kernels.backend.launch_counts`)."""
CPU_SAME_PATH = ("on a CPU the `auto` backend runs the PyTorch reference for CPU tensors - the same "
                 "path as `reference`; auto vs reference is measured on a CUDA GPU only")


class SearchStep:
    """One supernet forward + loss + backward on fixed synthetic inputs; call with a seed."""

    def __init__(self, backend: str, size: int = SIZE, batch: int = BATCH):
        self.backend = backend
        torch.manual_seed(0)
        self.net = Supernet(ModelConfig()).to(DEV).train()
        self.loss = PoseLoss(LossConfig())              # thesis weights, every term on
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, generator=gen).to(DEV)
        h = size // 4
        xy = torch.rand(batch, PEOPLE, 17, 2, generator=gen) * (size - 1)
        keypoints = torch.cat([xy, torch.full((batch, PEOPLE, 17, 1), 2.0)], dim=-1)
        heatmaps, joints = make_targets(keypoints, 4, h, sigma=2.0, max_people=PEOPLE)
        self.targets = {"heatmaps": heatmaps.to(DEV), "joints": joints.to(DEV),
                        "mask": torch.ones(batch, h, h, device=DEV)}
        specs = HigherHRNet().feature_specs()
        self.teacher = [torch.randn(batch, specs[name][0], size // specs[name][1], size // specs[name][1],
                                    generator=gen).to(DEV) for name in LossConfig().teacher.layers]

    def __call__(self, seed: int) -> float:
        with use_backend(self.backend):
            out = self.net(self.images, tau=1.0, seed=seed)
            total, _ = self.loss(out.exits, self.targets, step=seed, gflops=out.gflops, epoch=0,
                                 student_feats=out.cell_outputs, teacher_feats=self.teacher)
            self.net.zero_grad(set_to_none=True)
            total.backward()
        return float(total.detach())

    def peak_memory_mib(self, seed: int = 0) -> float:
        """``torch.cuda.max_memory_allocated`` during one step, in MiB (GPU only)."""
        torch.cuda.synchronize()
        self.net.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        self(seed)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _rounds(step: SearchStep):
    """A callable for benchmark.pedantic: each call runs the next seed's step."""
    seeds = iter(range(10**6))

    def call():
        step(next(seeds))
        _sync()
    return call


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_search_step(benchmark, backend):
    if backend == "auto" and not HAS_CUDA:
        pytest.skip(CPU_SAME_PATH)
    benchmark.group = "search-step"
    step = SearchStep(backend)
    _sync()
    benchmark.pedantic(_rounds(step), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if benchmark.stats is not None:          # None under --benchmark-disable
        benchmark.extra_info.update(device=DEVICE_NAME, backend=backend, input_size=SIZE, batch=BATCH,
                                    images_per_s=BATCH / benchmark.stats.stats.median)
    if HAS_CUDA:
        benchmark.extra_info["peak_memory_MiB"] = step.peak_memory_mib()


def _losses_and_launches(step: SearchStep, seeds: range) -> tuple[list[float], dict[str, int]]:
    """The losses of ``step`` for ``seeds`` and the Triton launches they took, per kernel."""
    kernels_backend.launch_counts.clear()
    kernels_backend.fallback_warnings.clear()
    losses = [step(seed) for seed in seeds]
    return losses, dict(kernels_backend.launch_counts)


def _median_seconds(step: SearchStep, rounds: int = ROUNDS, warmup: int = WARMUP) -> float:
    for seed in range(warmup):
        step(seed)
    times = []
    for seed in range(rounds):
        _sync()
        start = time.perf_counter()
        step(seed)
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_search_step_auto_vs_reference(benchmark):
    """GPU: the same steps on both backends (one network on the device at a time) - equal
    losses, and the speed and peak-memory ratios (issue target: >= 1.3x faster, <= 0.8x memory)."""
    if not HAS_CUDA:
        pytest.skip(CPU_SAME_PATH + "; peak memory (torch.cuda.max_memory_allocated) is a CUDA measure")
    benchmark.group = "search-step-ratio"
    ref = SearchStep("reference")
    ref_losses, ref_launches = _losses_and_launches(ref, range(3))
    assert ref_launches == {}
    ref_memory = ref.peak_memory_mib()
    ref_median = _median_seconds(ref)
    del ref
    torch.cuda.empty_cache()

    auto = SearchStep("auto")
    auto_losses, auto_launches = _losses_and_launches(auto, range(3))   # same architectures, weights, data
    assert auto_losses == pytest.approx(ref_losses, rel=1e-3, abs=1e-4)
    assert not kernels_backend.fallback_warnings, f"auto fell back to the reference: {kernels_backend.fallback_warnings}"
    missing = {name: auto_launches.get(name, 0) for name in STEP_KERNELS if auto_launches.get(name, 0) < 3}
    assert not missing, f"auto did not launch these Triton kernels once per step (3 steps): {missing}"
    auto_memory = auto.peak_memory_mib()
    benchmark.pedantic(_rounds(auto), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if benchmark.stats is None:
        pytest.skip("timings are off (--benchmark-disable): no speed-up to report")
    auto_median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=DEVICE_NAME, input_size=SIZE, batch=BATCH,
        reference_median_s=ref_median, auto_median_s=auto_median, speedup=ref_median / auto_median,
        reference_peak_memory_MiB=ref_memory, auto_peak_memory_MiB=auto_memory,
        memory_ratio=auto_memory / ref_memory)
    print(f"\nsearch step on {DEVICE_NAME} at {SIZE}x{SIZE}, batch {BATCH}: reference {ref_median * 1e3:.1f} ms, "
          f"{ref_memory:.0f} MiB; auto {auto_median * 1e3:.1f} ms, {auto_memory:.0f} MiB "
          f"(speedup {ref_median / auto_median:.2f}x, memory {auto_memory / ref_memory:.2f}x)")
