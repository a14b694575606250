"""Command-line plumbing shared by ``search`` and ``train``: arguments, ranks, the report.

Both run as ``python threempose/<job>.py``, ``python -m threempose.<job>`` or under the
DeepSpeed launcher (which adds ``--local_rank``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable, Iterator, Optional

from threempose.config import Config, check_config_command, load_config
from threempose.engine.distributed import DistContext, init_distributed
from threempose.engine.job import EpochJob
from threempose.util.cli import check_output_dir
from threempose.util.threads import apply_threads


def job_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every job takes: ``--config``, ``--resume`` and DeepSpeed's ``--local_rank``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="JSON config (e.g. configs/search-small.json)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def run_job(args: argparse.Namespace, command: str,
            make_job: Callable[[Config, DistContext], EpochJob]) -> int:
    """Load the config (refusing one written for the other ``command``: ``"search"`` or
    ``"train"``), join the ranks, run the job, tear down, print the artifacts (rank 0)."""
    cfg = load_config(args.config)
    check_config_command(args.config, command)
    if args.resume is None:
        check_output_dir(cfg.run.out_dir, "run.out_dir")
    plan = apply_threads(cfg.run.threads, cfg.data.num_workers)
    cfg.run.threads, cfg.data.num_workers = plan.intra_op, plan.workers      # recorded in config.json
    ctx = init_distributed(cfg.run.device)
    if ctx.is_main:
        print(f"[threempose] threads: {plan.describe()}", file=sys.stderr, flush=True)
    try:
        job = make_job(cfg, ctx)
        artifacts = job.run(resume=args.resume)
    finally:
        ctx.close()
    if ctx.is_main:
        for name, path in artifacts.items():
            print(f"{name}: {path}")
        print(f"run directory: {job.run_dir.path}")
    return 0


def take(iterable: Iterable[Any], n: int) -> Iterator[Any]:
    """The first ``n`` items of ``iterable``."""
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item


def cycle_epochs(loader, epoch: int) -> Iterator[Any]:
    """Endless batches of ``loader`` (an architecture split smaller than the train split):
    pass ``k`` of ``epoch`` uses the sampler order of ``epoch * 1000 + k``, so a resumed
    epoch sees the same batches."""
    k = 0
    while True:
        loader.sampler.set_epoch(epoch * 1000 + k)
        yield from loader
        k += 1


def steps_per_epoch(loader_len: int, cap: Optional[int]) -> int:
    """Batches of an epoch: the loader's length, capped by ``max_steps_per_epoch``."""
    return min(loader_len, cap) if cap else loader_len
