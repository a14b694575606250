"""Activation checkpointing: peak memory and step time of the thesis supernet at 512 on the CPU.

    pytest bench/test_bench_checkpointing.py -s         # 3-5 minutes on 2 loaded cores
    python bench/test_bench_checkpointing.py            # the same figures as JSON

One step is a Dyn-EGS sample of ``configs/search.json``'s supernet (4 rows x 10 layers,
C = 32, 9 ops per edge, EELs at layers 4 and 7), its forward on ``[B, 3, 512, 512]``, a
loss on every exit plus the FLOPs term, and the backward into weights and alpha/beta/m
(one torch thread; every step draws the same architecture). Each case runs in a fresh
process (``python this_file step CKPT BATCH STEPS`` or ``alternate BATCH PAIRS``) whose
environment sets the allocator.

What a CPU process's memory and time say depends on glibc's allocator more than on anything
else here: by default it keeps freed blocks in its heap (peak RSS above the live bytes) and
hands large ones back to the kernel, which faults them in again, zeroed, on the next
allocation (a checkpointed step allocates its recomputed activations anew in every backward,
and the heap grows by fragmentation for several steps). So cases run under one of three
allocator settings (glibc's environment variables):

* ``live``: ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is its own mapping,
  unmapped when freed, so RSS follows the live tensor bytes; the step's peak RSS is its peak of
  live memory, what a GPU's allocator must hold at least. Its times are not used (every large
  allocation faults);
* ``kept``: ``MALLOC_MMAP_MAX_=0`` (no block is its own mapping) and a 64 GiB
  ``MALLOC_TRIM_THRESHOLD_``: freed memory stays with the process. The plain and the
  checkpointed step then alternate in one process on one network (a warm-up of each first),
  so the heap already holds the plain step's peak and neither step faults memory in: the time
  ratio is the recomputation's compute, as on a GPU whose caching allocator reuses blocks;
* ``default``: glibc as it comes, each step kind in its own process: what a plain CPU run gets.

Memory: the first step's peak RSS minus the RSS just before it. Time: CPU time
(``time.process_time``: the machine is shared), medians over the steps after the warm-up.
Batches 1 and 2 (``live``) separate the per-image memory from the fixed part, from which the
README computes images per 80 GB GPU.

Targets: live peak memory with / without <= 0.5 at batch 2; step time (``kept``,
alternating) with / without <= 1.35. The ``default`` figures are reported beside them.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
MEMORY_RATIO, TIME_RATIO = 0.5, 1.35
ALLOCATORS = {
    "live": {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)},
    "kept": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)},
    "default": {},
}
GLIBC_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                     "MALLOC_ARENA_MAX")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _supernet():
    import torch

    from threempose.config import load_config
    from threempose.nas.supernet import Supernet
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Supernet(load_config(ROOT / "configs" / "search.json").model).train()


def _step(net, images) -> tuple[float, float, int]:
    """One step: ``(peak MiB above the RSS before it, CPU seconds, minor page faults)``."""
    before = _rss_mib()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu = time.process_time()
    out = net(images, tau=1.0, seed=1)
    loss = sum((e.heatmaps ** 2).mean() + e.tags.abs().mean() for e in out.exits) + 1e-3 * out.gflops
    loss.backward()
    seconds = time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    del out, loss
    net.zero_grad(set_to_none=True)
    return usage.ru_maxrss / 1024 - before, seconds, usage.ru_minflt - faults


def phase_step(checkpointing: bool, batch: int, steps: int) -> dict:
    """``steps`` steps of one kind in this process: the first one's peak memory, every step's
    CPU seconds and minor page faults."""
    import torch
    net = _supernet()
    if checkpointing:
        net.use_activation_checkpointing()
    images = torch.randn(batch, 3, SIZE, SIZE)
    peaks, times, faults = zip(*(_step(net, images) for _ in range(steps)))
    return {"checkpointing": checkpointing, "batch": batch, "peak_mib": peaks[0], "step_cpu_s": times,
            "minor_faults": faults}


def phase_alternate(batch: int, pairs: int) -> dict:
    """Plain and checkpointed steps alternating on one network (one warm-up of each, then
    ``pairs`` pairs, the order swapped every pair): CPU seconds and minor faults of each kind."""
    import torch
    net = _supernet()
    images = torch.randn(batch, 3, SIZE, SIZE)
    result = {False: {"step_cpu_s": [], "minor_faults": []}, True: {"step_cpu_s": [], "minor_faults": []}}
    for i in range(pairs + 1):
        for ckpt in ((False, True) if i % 2 == 0 else (True, False)):
            net.use_activation_checkpointing() if ckpt else net.use_activation_checkpointing(None)
            _, seconds, faults = _step(net, images)
            result[ckpt]["step_cpu_s"].append(seconds)       # the first of each is the warm-up
            result[ckpt]["minor_faults"].append(faults)
    return {"plain": result[False], "ckpt": result[True]}


def _run(args: list[str], allocator: str) -> dict:
    """``python this_file *args`` in a fresh process under ``allocator``'s glibc settings."""
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_MALLOC_VARS} | ALLOCATORS[allocator]
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"allocator": allocator}


def run_case(checkpointing: bool, batch: int, allocator: str, steps: int) -> dict:
    return _run(["step", str(int(checkpointing)), str(batch), str(steps)], allocator)


def _peak(case: dict) -> float:
    return case["peak_mib"]


def _time(case: dict) -> float:
    return statistics.median(case["step_cpu_s"][1:])


def measure() -> dict:
    load_before = os.getloadavg()
    cases = {}
    for ckpt in (False, True):
        cases[("live", ckpt, 2)] = run_case(ckpt, 2, "live", 1)
        cases[("live", ckpt, 1)] = run_case(ckpt, 1, "live", 1)
        cases[("default", ckpt, 2)] = run_case(ckpt, 2, "default", 4)
    alternate = _run(["alternate", "2", "3"], "kept")
    per_image = {c: cases[("live", c, 2)]["peak_mib"] - cases[("live", c, 1)]["peak_mib"] for c in (False, True)}
    fixed = {c: cases[("live", c, 1)]["peak_mib"] - per_image[c] for c in (False, True)}
    gpu_mib = 80e9 / 2**20

    def ratio(allocator: str, value) -> float:
        return value(cases[(allocator, True, 2)]) / value(cases[(allocator, False, 2)])

    return {"cases": {f"{a}_{'ckpt' if c else 'plain'}_b{b}": v for (a, c, b), v in cases.items()},
            "memory_ratio": ratio("live", _peak), "memory_ratio_default_rss": ratio("default", _peak),
            "alternate_kept": alternate,
            "time_ratio": _time(alternate["ckpt"]) / _time(alternate["plain"]),
            "time_ratio_default": ratio("default", _time),
            "per_image_mib": per_image, "fixed_mib": fixed,
            "images_per_80GB": {c: int((gpu_mib - fixed[c]) // per_image[c]) for c in (False, True)},
            "load_average": {"before": load_before, "after": os.getloadavg()}}


def test_checkpointing_halves_peak_memory_at_a_bounded_time_cost():
    r = measure()
    print(json.dumps(r, indent=1))
    assert r["memory_ratio"] <= MEMORY_RATIO and r["time_ratio"] <= TIME_RATIO


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "step":
        print(json.dumps(phase_step(bool(int(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "alternate":
        print(json.dumps(phase_alternate(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(measure(), indent=1))
