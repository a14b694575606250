"""Activation checkpointing: peak memory and step time of the thesis supernet at 512 on the CPU.

    pytest bench/test_bench_checkpointing.py -s         # several minutes on 2 loaded cores
    python bench/test_bench_checkpointing.py table      # the README rows

One step is a Dyn-EGS sample of ``configs/search.json``'s supernet (4 rows x 10 layers,
C = 32, 9 ops per edge, EELs at layers 4 and 7), its forward on ``[B, 3, 512, 512]``, a
loss on every exit plus the FLOPs term, and the backward into weights and alpha/beta/m
(one torch thread). Each case runs in a fresh process (``python this_file STEP ckpt batch``):
the step's peak memory is the process's peak RSS (``ru_maxrss``) minus its RSS just before
the step; time is the step's CPU time (``time.process_time``: the machine is shared, CPU
time is what one idle core would take). Batches 1 and 2 separate the per-image memory from
the fixed part, from which the README computes images per 80 GB GPU.

Targets: peak memory with / without <= 0.5 at batch 2; step time with / without <= 1.35.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
MEMORY_RATIO, TIME_RATIO = 0.5, 1.35


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def phase_step(checkpointing: bool, batch: int, steps: int = 2) -> dict:
    import torch

    from threempose.config import load_config
    from threempose.nas.supernet import Supernet
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = Supernet(load_config(ROOT / "configs" / "search.json").model).train()
    if checkpointing:
        net.use_activation_checkpointing()
    images = torch.randn(batch, 3, SIZE, SIZE)
    peaks, times = [], []
    for step in range(steps):
        before = _rss_mib()
        cpu = time.process_time()
        out = net(images, tau=1.0, seed=step)
        loss = sum((e.heatmaps ** 2).mean() + e.tags.abs().mean() for e in out.exits) + 1e-3 * out.gflops
        loss.backward()
        times.append(time.process_time() - cpu)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
        del out, loss
        net.zero_grad(set_to_none=True)
    return {"checkpointing": checkpointing, "batch": batch, "peak_mib": peaks[0], "step_cpu_s": min(times),
            "times": times, "peaks": peaks}


def run_case(checkpointing: bool, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "step", str(int(checkpointing)), str(batch)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> dict:
    cases = {(c, b): run_case(c, b) for b in (2, 1) for c in (False, True)}
    per_image = {c: cases[(c, 2)]["peak_mib"] - cases[(c, 1)]["peak_mib"] for c in (False, True)}
    fixed = {c: cases[(c, 1)]["peak_mib"] - per_image[c] for c in (False, True)}
    gpu_mib = 80e9 / 2**20
    return {"cases": {f"{'ckpt' if c else 'plain'}_b{b}": v for (c, b), v in cases.items()},
            "memory_ratio": cases[(True, 2)]["peak_mib"] / cases[(False, 2)]["peak_mib"],
            "time_ratio": cases[(True, 2)]["step_cpu_s"] / cases[(False, 2)]["step_cpu_s"],
            "per_image_mib": per_image, "fixed_mib": fixed,
            "images_per_80GB": {c: int((gpu_mib - fixed[c]) // per_image[c]) for c in (False, True)}}


def test_checkpointing_halves_peak_memory_at_a_bounded_time_cost():
    r = measure()
    print(json.dumps(r, indent=1))
    assert r["memory_ratio"] <= MEMORY_RATIO and r["time_ratio"] <= TIME_RATIO


if __name__ == "__main__":
    if sys.argv[1] == "step":
        print(json.dumps(phase_step(bool(int(sys.argv[2])), int(sys.argv[3]))))
    else:
        print(json.dumps(measure(), indent=1))
