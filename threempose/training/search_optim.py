"""The optimizers of an architecture search, shared by 3M-Pose and PNFS mode.

``search.strategy`` decides who updates alpha/beta/m:

* ``bilevel`` - their own Adam (``search.arch_lr``, L2 weight decay ``search.arch_weight_decay``
  as DARTS' first-order code and PNFS' first-order baseline use, MultiStepLR at ``arch_lr_milestones``),
  stepped on a held-out batch by :meth:`SearchOptimizers.arch_step` (with its own GradScaler
  under ``run.amp: fp16``); the weight step leaves them alone.
* ``synchronous`` - the weight optimizer, as its param group 1 (PNFS), with the same
  epoch schedule applied by :meth:`SearchOptimizers.end_epoch`.
* ``random`` - nobody: drawn once from N(0, 1) and frozen (PNFS' baseline).

Architecture gradients are averaged over ranks, and :meth:`SearchOptimizers.check_in_sync`
verifies after every epoch that every rank holds the same alpha/beta/m.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from threempose.config import Config
from threempose.engine.distributed import DistContext
from threempose.engine.weights import WeightOptimizer, amp_grad_scaler
from threempose.util.files import atomic_torch_save

RANDOM_ARCH_STREAM = 12345        # seed offset of the random strategy's architecture draw


class ArchDivergenceError(RuntimeError):
    """The ranks of a distributed search hold different architecture parameters."""


def multistep(base: float, milestones: Sequence[int], gamma: float, epoch: int) -> float:
    """``base * gamma ** (number of milestones <= epoch)``: a MultiStepLR value at ``epoch``."""
    return base * gamma ** sum(1 for m in milestones if epoch >= m)


class SearchOptimizers:
    """The weight optimizer (``weights``) and, for ``bilevel``, the arch Adam and its schedule.

    Args:
        module: the network (handed to DeepSpeed under the launcher).
        weight_params, arch_params: the network's weights and its alpha/beta/m tensors.
        arch_names: a name per arch tensor, for error messages.
    """

    def __init__(self, module: nn.Module, weight_params: list, arch_params: list, cfg: Config,
                 ctx: DistContext, arch_names: Sequence[str]):
        s = cfg.search
        self.cfg, self.ctx, self.arch_params, self.arch_names = s, ctx, list(arch_params), list(arch_names)
        if s.strategy == "random":
            g = torch.Generator().manual_seed(cfg.run.seed + RANDOM_ARCH_STREAM)
            with torch.no_grad():
                for p in self.arch_params:
                    p.copy_(torch.randn(p.shape, generator=g))
                    p.requires_grad_(False)
        groups = [{"params": weight_params, "lr": s.weight_lr}]
        if s.strategy == "synchronous":
            groups.append({"params": self.arch_params, "lr": s.arch_lr})
        self.weights = WeightOptimizer(module, groups, cfg, ctx, grad_clip=s.grad_clip)
        self.arch_opt: Optional[torch.optim.Adam] = None
        self.arch_sched = None
        self.arch_scaler: Optional[torch.amp.GradScaler] = None
        if s.strategy == "bilevel":
            self.arch_opt = torch.optim.Adam(self.arch_params, lr=s.arch_lr, weight_decay=s.arch_weight_decay)
            self.arch_scaler = amp_grad_scaler(self.weights.amp_dtype, ctx.device)
            self.arch_sched = torch.optim.lr_scheduler.MultiStepLR(self.arch_opt, s.arch_lr_milestones,
                                                                   s.arch_lr_gamma)

    @property
    def bilevel(self) -> bool:
        return self.arch_opt is not None

    def arch_step(self, loss: torch.Tensor) -> None:
        """Bilevel: gradients of ``loss`` w.r.t. alpha/beta/m only, averaged over ranks, one Adam
        step. Under fp16 the loss is scaled and the step skipped when a gradient is not finite
        (every rank agrees: the gradients are averaged before the check)."""
        scaler = self.arch_scaler
        grads = torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss,
                                    self.arch_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.arch_params, grads)]
        self.ctx.all_reduce_mean_(grads)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        if scaler is not None:
            scaler.step(self.arch_opt)
            scaler.update()
        else:
            self.arch_opt.step()
        self.arch_opt.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def weights_only(self) -> Iterator[None]:
        """Around a weight step's forward and backward: alpha/beta/m get no gradient unless the
        strategy is ``synchronous`` (they belong to the weight optimizer then)."""
        frozen = [] if self.cfg.strategy == "synchronous" else self.arch_params
        saved = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, s in zip(frozen, saved):
                p.requires_grad_(s)

    def arch_lr(self) -> float:
        """The architecture learning rate now (0 for ``random``)."""
        if self.arch_opt is not None:
            return self.arch_opt.param_groups[0]["lr"]
        return self.weights.lr(group=1) if self.cfg.strategy == "synchronous" else 0.0

    def end_epoch(self, epoch: int) -> None:
        """Advance the arch schedule after ``epoch`` (both ``bilevel`` and ``synchronous``)."""
        if self.arch_sched is not None:
            self.arch_sched.step()
        if self.cfg.strategy == "synchronous":
            self.weights.set_lr(multistep(self.cfg.arch_lr, self.cfg.arch_lr_milestones,
                                          self.cfg.arch_lr_gamma, epoch + 1), group=1)

    def check_in_sync(self, epoch: int, step: int) -> None:
        """Raise :class:`ArchDivergenceError` (on every rank) unless alpha/beta/m are identical
        on all ranks. A collective: one broadcast and one all-reduce of the arch parameters."""
        gaps = self.ctx.divergence([p.data for p in self.arch_params])
        bad = [f"{name} by up to {gap:.3g}" for name, gap in zip(self.arch_names, gaps) if gap != 0.0]
        if bad:
            raise ArchDivergenceError(
                f"after epoch {epoch + 1} (step {step}) the architecture parameters of the "
                f"{self.ctx.world_size} ranks differ from rank 0's: {', '.join(bad)}; every rank must "
                "draw the same Gumbel sample and see the same averaged arch gradients")

    def save_rank_arch(self, run_dir, global_step: int) -> Path:
        """Every rank: this rank's architecture tensors to ``arch/final_rank<R>.pt`` (by arch name,
        on the CPU, with ``rank``, ``world_size``, ``global_step``), to compare ranks after a run."""
        path = run_dir.arch_dir / f"final_rank{self.ctx.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)      # a node without the shared run dir
        atomic_torch_save(path, {**{name: p.detach().cpu().clone() for name, p in
                                    zip(self.arch_names, self.arch_params)},
                                 "rank": self.ctx.rank, "world_size": self.ctx.world_size,
                                 "global_step": global_step})
        return path

    def stateful(self) -> dict[str, Any]:
        """For checkpoints (see :meth:`threempose.engine.job.EpochJob.stateful`)."""
        return {"arch_optimizer": self.arch_opt, "arch_scheduler": self.arch_sched,
                "arch_scaler": self.arch_scaler}
