"""Process-group context: one process, or many ranks started by the DeepSpeed launcher.

``deepspeed threempose/search.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK for each
rank; :func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on
CPUs). A plain ``python threempose/search.py ...`` runs as a single rank with no
process group, and every collective below is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Who this process is and where it computes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False          # True when started by a distributed launcher

    @property
    def is_main(self) -> bool:
        """Rank 0 writes run outputs (checkpoints, metrics, genotype)."""
        return self.rank == 0

    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Average each tensor over all ranks, in place (None entries are skipped)."""
        if self.world_size == 1:
            return
        for t in tensors:
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.world_size)

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place."""
        if self.world_size == 1:
            return
        for t in tensors:
            dist.broadcast(t, src=src)

    def all_reduce_sum(self, value: float) -> float:
        """Sum a Python number over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down (a rank left without this may abort at exit)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's CUDA device when CUDA is available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def launched_by_launcher() -> bool:
    """True when a distributed launcher (deepspeed, torchrun) set this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group if a launcher started us; otherwise a single-rank context."""
    if not launched_by_launcher():
        return DistContext(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=device, launched=True)
