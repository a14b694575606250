"""Process-group context: one process, or many ranks started by the DeepSpeed launcher.

``deepspeed threempose/search.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK for each
rank; :func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on
CPUs). A plain ``python threempose/search.py ...`` runs as a single rank with no
process group, and every collective below is the identity.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

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
        """Average each tensor over all ranks, in place (None entries are skipped).

        The tensors travel in one flat buffer per dtype and device (one collective each) and
        are copied back, so non-contiguous tensors (autograd returns strided views, e.g. for
        slices of a parameter) are averaged too: gloo's ``dist.all_reduce`` on such a view
        reduces the wrong elements, and a bilevel search's ranks drifted apart.
        """
        if self.world_size == 1:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            if t is not None:
                groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view(t.shape))

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place."""
        if self.world_size == 1:
            return
        for t in tensors:
            if t.is_contiguous():
                dist.broadcast(t, src=src)
            else:                       # a strided view: broadcast a copy, then write it back
                buf = t.contiguous()
                dist.broadcast(buf, src=src)
                t.copy_(buf)

    def all_reduce_sum(self, value: float) -> float:
        """Sum a Python number over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def divergence(self, tensors: Sequence[torch.Tensor], src: int = 0) -> list[float]:
        """For each tensor, the largest ``|t - t on rank src|`` over all elements and ranks.

        A collective (every rank must call it with tensors of the same shapes); every rank
        gets the same list. NaN differences count as ``inf``. All zeros in one process.
        """
        if self.world_size == 1:
            return [0.0] * len(tensors)
        mine = torch.cat([t.detach().reshape(-1) for t in tensors]).to(self.device)
        ref = mine.clone()
        dist.broadcast(ref, src=src)
        gap = (mine - ref).abs().nan_to_num(nan=float("inf"))
        sizes = [t.numel() for t in tensors]
        worst = torch.stack([g.max() if g.numel() else gap.new_zeros(())
                             for g in gap.split(sizes)]).to(torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return [float(v) for v in worst.cpu()]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, failed: Optional[bool] = None) -> None:
        """Tear the process group down (a rank left without this may abort at exit).

        On success the ranks first meet at a barrier. When this rank is failing
        (``failed``; by default: an exception is propagating through the caller's
        ``finally``) it skips the barrier - the other ranks may be waiting in a different
        collective, and a barrier would hang it; it exits with an error instead and the
        launcher stops the others.
        """
        if self.world_size > 1 and dist.is_initialized():
            if failed is None:
                failed = sys.exc_info()[0] is not None
            if not failed:
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
