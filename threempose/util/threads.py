"""How many CPU threads a threempose process uses: torch's intra-op threads and loader workers.

On a small or shared machine, torch's default (one intra-op thread per core) plus loader
workers oversubscribe the cores: OpenMP threads spin at every barrier waiting for a thread
that another process (or a worker) holds, and a tiny model runs 10x slower. The policy:

* **usable cores** (:func:`usable_cores`): the CPUs this process may run on (its affinity
  mask), capped by the cgroup CPU quota (``/sys/fs/cgroup/cpu.max``, or cgroup v1's
  ``cpu.cfs_quota_us``), divided among the ranks on this machine (``LOCAL_WORLD_SIZE`` from
  torchrun, ``LOCAL_SIZE`` from the DeepSpeed launcher);
* **loader workers**: ``data.num_workers`` at most, and at most usable cores - 1 (the main
  process keeps a core); each worker runs single-threaded (:func:`single_threaded_worker`);
* **intra-op threads**: half of the cores left after the workers (at least 1), so another
  process or two on the machine cannot stall the run; ``OMP_NUM_THREADS`` when set, and
  ``run.threads`` (> 0) above both, replace this choice.

The thread count changes the order of floating-point reductions, so a run is bit-identical
to another (or to its own resumption) only with the same intra-op thread count: a search or
training run records it as ``run.threads`` in its ``config.json``, and ``--resume`` warns
when the continuation runs with a different one. The worker count does not change results.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> Optional[float]:
    """CPUs the cgroup quota allows (e.g. 1.5), or None without a quota.

    Reads cgroup v2's ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``), else cgroup
    v1's ``cpu/cpu.cfs_quota_us`` and ``cpu/cpu.cfs_period_us`` (quota -1: none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def ranks_per_machine(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    return 1


def usable_cores(env: Mapping[str, str] = os.environ, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may keep busy: its affinity mask, capped by the cgroup CPU quota
    (rounded up), shared by the ranks on this machine; at least 1. Other components (a data
    backend's CPU threads) should size their pools from this."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores // ranks_per_machine(env))


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`plan_threads` chose, and why (``source``: ``run.threads``,
    ``OMP_NUM_THREADS`` or ``cores``)."""

    intra_op: int
    workers: int
    cores: int
    source: str

    def describe(self) -> str:
        worker_text = f"{self.workers} loader worker{'s' if self.workers != 1 else ''}"
        return (f"{self.intra_op} intra-op thread{'s' if self.intra_op != 1 else ''} ({self.source}), "
                f"{worker_text}, {self.cores} usable core{'s' if self.cores != 1 else ''}")


def plan_threads(threads: int = 0, num_workers: int = 0, env: Mapping[str, str] = os.environ,
                 cores: Optional[int] = None) -> ThreadPlan:
    """The policy of the module docstring. ``threads``: ``run.threads`` (0 = choose);
    ``num_workers``: ``data.num_workers`` (the most workers wanted); ``cores`` defaults to
    :func:`usable_cores`."""
    cores = usable_cores(env) if cores is None else cores
    workers = max(0, min(num_workers, cores - 1))
    omp = env.get("OMP_NUM_THREADS", "")
    if threads > 0:
        return ThreadPlan(threads, workers, cores, "run.threads")
    if omp.isdigit() and int(omp) > 0:
        return ThreadPlan(int(omp), workers, cores, "OMP_NUM_THREADS")
    return ThreadPlan(max(1, (cores - workers) // 2), workers, cores, "cores")


def apply_threads(threads: int = 0, num_workers: int = 0) -> ThreadPlan:
    """Plan (:func:`plan_threads`) and set torch's intra-op threads for this process."""
    import torch

    plan = plan_threads(threads, num_workers)
    torch.set_num_threads(plan.intra_op)
    return plan


def single_threaded_worker(_: int = 0) -> None:
    """A loader worker's ``worker_init_fn``: one torch thread, and one thread for the
    OpenMP/BLAS libraries of any process it starts."""
    import torch

    torch.set_num_threads(1)
    for name in THREAD_ENV:
        os.environ[name] = "1"


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
