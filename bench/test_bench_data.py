"""Data pipeline throughput: decode + augment + targets, in images per second.

    pytest bench/test_bench_data.py

Every row runs the thesis setting (1/4 heatmaps, sigma 2, 30 people) on 32
synthetic images of 256-640 px, at a 512 and at a 128 crop. ``images_per_s`` in
each benchmark's extra_info is the figure to report; the torch and DALI rows of
one run are the comparison (``--benchmark-group-by=param``).

* torch, CPU path: one process running what a DataLoader worker runs per sample
  (decode, Pillow warp, targets); a loader scales it by ``num_workers``.
* torch, GPU-side path: decode + pad on the CPU, then warp and targets on the GPU
  for batches of 16 (skipped without CUDA).
* DALI, CPU operators: a :class:`~threempose.data.dali_pipeline.DaliLoader` pass in
  batches of 16 with one DALI thread (Python resolves keys and masks meanwhile), the
  CPU counterpart of one torch worker (skipped without the ``dali`` extra).
* DALI, ``mixed`` decode + ``gpu`` warp (skipped without CUDA or the extra).
"""
import dataclasses
import importlib.util

import pytest
import torch

from threempose.config import DataConfig
from threempose.data.augment_gpu import augment_batch, collate_raw
from threempose.data.coco import CocoKeypoints
from threempose.data.sampler import EpochSampler
from threempose.data.synthetic import generate

IMAGES = 32
BATCH = 16
CFG = DataConfig(input_size=512, heatmap_stride=4, sigma=2.0, max_people=30)
SIZES = [512, 128]
HAS_CUDA = torch.cuda.is_available()


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


needs_dali = pytest.mark.skipif(not _has_dali(), reason="the DALI rows need the extra: pip install -e '.[dali]'")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="the GPU-side rows need a CUDA device")


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_data")
    return out / "images", generate(out, IMAGES, seed=0, min_size=256, max_size=640, max_people=4)


def _measure(benchmark, epoch) -> None:
    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:          # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.mean


@pytest.mark.parametrize("size", SIZES)
def test_torch_cpu_path_images_per_second(benchmark, synthetic_set, size):
    torch.set_num_threads(1)                    # as in a DataLoader worker
    ds = CocoKeypoints(*synthetic_set, dataclasses.replace(CFG, input_size=size), train=True, seed=0)

    def epoch():
        for i in range(len(ds)):
            ds[(i, 0)]

    _measure(benchmark, epoch)


@needs_cuda
@pytest.mark.parametrize("size", SIZES)
def test_torch_gpu_path_images_per_second(benchmark, synthetic_set, size):
    cfg = dataclasses.replace(CFG, input_size=size)
    ds = CocoKeypoints(*synthetic_set, cfg, train=True, seed=0, raw=True)
    device = torch.device("cuda")

    def epoch():
        for start in range(0, IMAGES, BATCH):
            batch = collate_raw([ds[(i, 0)] for i in range(start, start + BATCH)])
            augment_batch(batch, cfg, device)
        torch.cuda.synchronize()

    _measure(benchmark, epoch)


def _dali_epoch(synthetic_set, size: int, gpu: bool):
    from threempose.data.dali_pipeline import DaliLoader
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, input_size=size)
    ds = CocoKeypoints(*synthetic_set, cfg, train=True, seed=0)
    loader = DaliLoader(ds, EpochSampler(range(IMAGES), 0, shuffle=True), batch_size=BATCH, drop_last=True,
                        device=torch.device("cuda" if gpu else "cpu"), gpu=gpu, num_threads=1)

    def epoch():
        for _ in loader:
            pass
        if gpu:
            torch.cuda.synchronize()
    return epoch


@needs_dali
@pytest.mark.parametrize("size", SIZES)
def test_dali_cpu_images_per_second(benchmark, synthetic_set, size):
    _measure(benchmark, _dali_epoch(synthetic_set, size, gpu=False))


@needs_dali
@needs_cuda
@pytest.mark.parametrize("size", SIZES)
def test_dali_gpu_images_per_second(benchmark, synthetic_set, size):
    _measure(benchmark, _dali_epoch(synthetic_set, size, gpu=True))
