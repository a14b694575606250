"""Data pipeline throughput: decode + augment + targets, in images per second.

    pytest bench/test_bench_data.py

Both benchmarks use the thesis setting (512 crop, 1/4 heatmaps, sigma 2, 30
people) on 32 synthetic images of 256-640 px. ``images_per_s`` in each
benchmark's extra_info is the figure to report.

* CPU path: one process running what a DataLoader worker runs per sample
  (decode, Pillow warp, targets); a loader scales it by ``num_workers``.
* GPU-side path: decode + pad on the CPU, then warp and targets on the GPU for
  batches of 16 (skipped without CUDA).
"""
import pytest
import torch

from threempose.config import DataConfig
from threempose.data.augment_gpu import augment_batch, collate_raw
from threempose.data.coco import CocoKeypoints
from threempose.data.synthetic import generate

IMAGES = 32
BATCH = 16
CFG = DataConfig(input_size=512, heatmap_stride=4, sigma=2.0, max_people=30)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_data")
    return out / "images", generate(out, IMAGES, seed=0, min_size=256, max_size=640, max_people=4)


def test_cpu_path_images_per_second(benchmark, synthetic_set):
    torch.set_num_threads(1)                    # as in a DataLoader worker
    ds = CocoKeypoints(*synthetic_set, CFG, train=True, seed=0)

    def epoch():
        for i in range(len(ds)):
            ds[(i, 0)]

    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:          # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.mean


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU-side path needs a CUDA device")
def test_gpu_path_images_per_second(benchmark, synthetic_set):
    ds = CocoKeypoints(*synthetic_set, CFG, train=True, seed=0, raw=True)
    device = torch.device("cuda")

    def epoch():
        for start in range(0, IMAGES, BATCH):
            batch = collate_raw([ds[(i, 0)] for i in range(start, start + BATCH)])
            augment_batch(batch, CFG, device)
        torch.cuda.synchronize()

    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:          # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.mean
