"""COCO-scale data: build time, main-process memory, DataLoader workers' private memory, samples/s.

    pytest bench/test_bench_scale.py -s            # 60,000 images, 150,130 people (a few minutes)
    SCALE_IMAGES=6000 SCALE_PEOPLE=15013 pytest bench/test_bench_scale.py -s
    python bench/test_bench_scale.py table [--images N --people N]   # the README table

The annotation file comes from ``bench/coco_scale_file.py`` (images hard-linked to one
320 x 240 JPEG). Each measurement runs in a fresh process (``python this_file PHASE``) so
the peak RSS is that of the phase alone:

* ``build``: :class:`~threempose.data.coco.CocoKeypoints` construction time (CPU and wall) and the peak
  RSS of the process (``ru_maxrss``) after it; beside it, for scale, the same for the
  pycocotools index the data set used before (``COCO(file)``), as a time ratio since the
  machine is shared.
* ``workers``: 2 DataLoader workers (batch 16, 128 px input, set up as the train loader's:
  ``worker_options``) read 400 batches (of 410, so they are still at work at the last
  reading); each worker's private memory (``Private_Clean + Private_Dirty`` of
  ``/proc/PID/smaps_rollup``, i.e. USS) after every batch. A worker's USS swings by ~10 MiB
  and more between its heap releases (every 4th batch: the batches between refill the pages
  a release handed back), so a single reading depends on where in that cycle the worker
  happens to be: growth is that of each worker's peak over a window of 50 batches, 51-100 ->
  351-400 (the single readings at 100 and 400 are reported beside it, as
  ``worker_point_growth_mib``). That growth is the creep the workers must not have
  (copy-on-read of the index, freed heap memory kept resident).
  ``workers_plain``: the same without the workers' heap release.
* ``speed``: samples/s with 0, 1 and 2 workers, and 2 workers without the heap release, over
  40 batches each (interleaved, ratios).
* ``masks``: share of the per-sample time spent rasterising ignored regions (the data
  for the cache-or-not decision).

Targets: build <= 30 s, main peak RSS <= 1.5 GiB, worker private growth <= 8 MiB over 300 batches.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

IMAGES = int(os.environ.get("SCALE_IMAGES", 60_000))
PEOPLE = int(os.environ.get("SCALE_PEOPLE", 150_130))
BATCH = 16
INPUT = 128
BUILD_S, MAIN_RSS_MIB, GROWTH_MIB = 30.0, 1536.0, 8.0
WINDOW = 50                 # batches: a worker's peak over batches 51-100 and 351-400


def _private_mib(pid: int) -> float:
    """USS of a process: its private clean + dirty pages, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def _dataset(root: Path, train: bool = True):
    from threempose.config import DataConfig
    from threempose.data.coco import CocoKeypoints
    cfg = DataConfig(input_size=INPUT, heatmap_stride=4, sigma=2.0, max_people=30, batch_size=BATCH)
    return CocoKeypoints(root / "images", root / "annotations.json", cfg, train=train, seed=0)


def _loader(ds, workers: int, batches: int, release_heap: bool = True):
    """The train loader's setup (``worker_options``); ``release_heap=False``: without the workers'
    periodic ``malloc_trim`` (:class:`~threempose.data.loader.HeapReleasingCollate`), for comparison."""
    import torch

    from threempose.data.loader import collate_samples, worker_options
    from threempose.data.sampler import EpochSampler
    sampler = EpochSampler([i % len(ds) for i in range(batches * BATCH)], seed=0, shuffle=True)   # small sets repeat
    options = worker_options(workers, collate_samples)
    if not release_heap:
        options["collate_fn"] = collate_samples
    return torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=BATCH, drop_last=True, **options)


def phase_build(root: Path) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    ds = _dataset(root)
    build, build_cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"build_s": build, "build_cpu_s": build_cpu, "main_peak_rss_mib": peak, "index_mib": ds.index.nbytes() / 2**20,
            "images": len(ds), "people": len(ds.index.keypoints)}


def phase_pycocotools(root: Path) -> dict:
    import contextlib
    import io

    from pycocotools.coco import COCO
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(root / "annotations.json"))
    return {"pycocotools_s": time.perf_counter() - start, "pycocotools_cpu_s": time.process_time() - cpu,
            "pycocotools_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def phase_workers(root: Path, release_heap: bool = True) -> dict:
    import torch
    torch.set_num_threads(1)
    ds = _dataset(root)
    iterator = iter(_loader(ds, 2, 410, release_heap))    # workers still busy at batch 400
    uss: dict[int, list[float]] = {}
    for batch in range(1, 401):
        next(iterator)
        uss[batch] = [_private_mib(w.pid) for w in iterator._workers]
    window = {end: [max(uss[b][w] for b in range(end - WINDOW + 1, end + 1)) for w in range(2)] for end in (100, 400)}
    return {"worker_uss_mib": {b: uss[b] for b in (1, 100, 400)}, "worker_window_peak_mib": window,
            "worker_growth_mib": max(b - a for a, b in zip(window[100], window[400])),
            "worker_point_growth_mib": max(b - a for a, b in zip(uss[100], uss[400])),
            "release_heap": release_heap}


def phase_workers_plain(root: Path) -> dict:
    """``workers`` without the heap release (what it fixes)."""
    return phase_workers(root, release_heap=False)


def phase_speed(root: Path) -> dict:
    import torch
    torch.set_num_threads(1)
    ds = _dataset(root)
    setups = {"0": (0, True), "1": (1, True), "2": (2, True), "2 plain": (2, False)}   # plain: no heap release
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(2):                                # interleaved rounds: load drifts, ratios hold
        for name, (workers, release_heap) in setups.items():
            iterator = iter(_loader(ds, workers, 41, release_heap))
            next(iterator)                            # worker start-up is not throughput
            start = time.perf_counter()
            n = sum(len(b["image_id"]) for b in iterator)
            rates[name].append(n / (time.perf_counter() - start))
    return {"samples_per_s": {name: max(r) for name, r in rates.items()}}


def phase_masks(root: Path) -> dict:
    from threempose.data.targets import ignore_mask
    ds = _dataset(root)
    n, mask_s, sample_s, regions = 300, 0.0, 0.0, 0
    for i in range(n):
        start = time.perf_counter()
        _, found = ds.annotations(i)
        width, height = ds.index.size(i)
        ignore_mask(found, height, width)
        mask_s += time.perf_counter() - start
        regions += len(found)
        start = time.perf_counter()
        ds[(i, 0)]
        sample_s += time.perf_counter() - start
    return {"mask_ms": 1e3 * mask_s / n, "sample_ms": 1e3 * sample_s / n, "mask_share": mask_s / sample_s,
            "regions_per_image": regions / n}


PHASES = {"build": phase_build, "pycocotools": phase_pycocotools, "workers": phase_workers,
          "workers_plain": phase_workers_plain, "speed": phase_speed, "masks": phase_masks}


def run_phase(name: str, root: Path) -> dict:
    """One phase in a fresh Python process; its JSON result."""
    out = subprocess.run([sys.executable, __file__, name, str(root)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def coco_sized(root: Path, images: int = IMAGES, people: int = PEOPLE) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from coco_scale_file import write_coco_sized
    if not (root / "annotations.json").is_file():
        write_coco_sized(root, images, people)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return coco_sized(tmp_path_factory.mktemp("coco_scale"))


def test_build_time_and_main_peak_rss(root):
    r = run_phase("build", root)
    print(r)
    assert r["build_cpu_s"] <= BUILD_S and r["main_peak_rss_mib"] <= MAIN_RSS_MIB     # CPU s: a shared machine


def test_worker_private_memory_stays_flat(root):
    r = run_phase("workers", root)
    print(r)
    assert r["worker_growth_mib"] <= GROWTH_MIB


def test_samples_per_second_with_0_1_2_workers(root):
    print(run_phase("speed", root))


def table(root: Path) -> str:
    build, ref = run_phase("build", root), run_phase("pycocotools", root)
    workers, plain = run_phase("workers", root), run_phase("workers_plain", root)
    speed, masks = run_phase("speed", root), run_phase("masks", root)
    rate = speed["samples_per_s"]

    def uss(r: dict) -> str:
        return " ; ".join("/".join(f"{r['worker_uss_mib'][str(b)][w]:.1f}" for b in (1, 100, 400)) for w in range(2))

    def growth(r: dict) -> str:
        return f"{r['worker_growth_mib']:.1f} MiB (single readings: {r['worker_point_growth_mib']:.1f})"

    rows = [
        ("build `CocoKeypoints`", "<= 30 s", f"{build['build_cpu_s']:.1f} s CPU, {build['build_s']:.1f} s wall "
         f"(pycocotools `COCO(file)` alone: {ref['pycocotools_cpu_s']:.1f} s CPU)"),
        ("main peak RSS after build", "<= 1.5 GiB", f"{build['main_peak_rss_mib']:.0f} MiB (pycocotools: "
         f"{ref['pycocotools_peak_rss_mib']:.0f} MiB); the index itself {build['index_mib']:.0f} MiB"),
        ("worker private memory (USS) at batch 1 / 100 / 400", "", f"{uss(workers)} MiB (without the heap "
         f"release: {uss(plain)})"),
        ("worker private growth, peak of batches 51-100 -> 351-400", "<= 8 MiB",
         f"{growth(workers)} (without the heap release: {growth(plain)})"),
        ("samples/s with 0 / 1 / 2 workers", "", " / ".join(f"{rate[str(w)]:.0f}" for w in range(3))
         + f" (2 without the heap release: {rate['2 plain']:.0f})"),
        ("ignored-region masks per sample", "", f"{masks['mask_ms']:.2f} ms of {masks['sample_ms']:.1f} ms "
         f"({100 * masks['mask_share']:.1f} %, {masks['regions_per_image']:.1f} regions per image)"),
    ]
    lines = [f"{build['images']:,} images, {build['people']:,} people with keypoints:", "",
             "| measure | target | result |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


if __name__ == "__main__":
    if sys.argv[1] in PHASES:
        print(json.dumps(PHASES[sys.argv[1]](Path(sys.argv[2]))))
    else:
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("command", choices=["table"])
        parser.add_argument("--root", default="/tmp/threempose-coco-scale")
        parser.add_argument("--images", type=int, default=IMAGES)
        parser.add_argument("--people", type=int, default=PEOPLE)
        args = parser.parse_args()
        print(table(coco_sized(Path(args.root), args.images, args.people)))
