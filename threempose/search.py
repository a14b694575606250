"""Architecture search (thesis §3.2-3.4, §4.1 "Searching"; PNFS §III-F).

    python threempose/search.py --config configs/search-small.json
    deepspeed threempose/search.py --config configs/search.json        # all local GPUs
    deepspeed --hostfile hosts threempose/search.py --config ...       # many machines
    python threempose/search.py --config ... --resume runs/search-small-20261123-101500

Strategies (``search.strategy``):

* ``bilevel`` - first-order bilevel: each step updates alpha/beta/m on a batch of the
  held-out part of the train split (``search.arch_val_fraction``), then the weights on a
  train batch; two Adam optimizers (weights: ``search.weight_lr`` constant; arch:
  ``search.arch_lr`` decayed by ``arch_lr_gamma`` at ``arch_lr_milestones``).
* ``synchronous`` - one Adam over weights and arch parameters (PNFS).
* ``random`` - the architecture is drawn once at random and fixed; only weights train
  (PNFS' random-sampling baseline).

Every rank draws the same Gumbel sample (the seed is a function of run seed and step) and
architecture gradients are averaged over ranks, so the architecture parameters are
identical on every rank at every step; after every epoch a collective check raises
:class:`~threempose.engine.search_optim.ArchDivergenceError` if any rank's alpha/beta/m differ from rank 0's, and at the end
every rank writes its own ``arch/final_rank<R>.pt``. Under the DeepSpeed launcher the weights
are stepped by a DeepSpeed engine (ZeRO stage etc. from the config's ``deepspeed`` section).
The run ends with ``genotype.json`` and ``profile.json`` in the run directory.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `python threempose/search.py`: drop this folder from sys.path (its modules would shadow
    # the standard library's, e.g. `profile`) and import the installed package instead.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from threempose.cli import entry_point
from threempose.config import Config
from threempose.data.loader import build_loaders
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.launch import cycle_epochs, job_arguments, run_job, steps_per_epoch, take
from threempose.engine.search_optim import SearchOptimizers
from threempose.engine.validate import validation_ap
from threempose.kernels import set_backend
from threempose.losses import PoseLoss
from threempose.nas.derived import DerivedNet
from threempose.nas.dyn_egs import MAX_SEED, gumbel_tau
from threempose.nas.fabric import Supernet
from threempose.pnfs.dispatch import pnfs_main
from threempose.nas.latency_table import LatencyTable
from threempose.profile import profile_genotype
from threempose.teacher import Teacher, build_teacher

ARCH_SEED_STRIDE = 1_000_003
ARCH_NAMES = ("alpha", "beta", "m_alpha", "m_beta")


def step_seed(run_seed: int, global_step: int, phase: int) -> int:
    """The Gumbel seed of one forward: a function of (run seed, step, phase) only, so every
    rank (and a resumed run) draws the same architecture. ``phase`` 0 = weights, 1 = arch."""
    return (run_seed * ARCH_SEED_STRIDE + 2 * global_step + phase) % MAX_SEED


class SearchJob(EpochJob):
    """One architecture search (see the module docstring)."""

    kind = "search"

    def __init__(self, cfg: Config, ctx: DistContext):
        super().__init__(cfg, ctx, cfg.search.epochs)
        s = cfg.search
        set_backend(cfg.run.kernels)
        self.device = ctx.device
        self.teacher: Optional[Teacher] = build_teacher(cfg.loss, self.device)   # first: fails fast
        self.latency_table = load_latency_table(cfg, self.device)     # before anything slow
        self.data = build_loaders(
            cfg.data, seed=cfg.run.seed, device=self.device, rank=ctx.rank, world_size=ctx.world_size,
            arch_fraction=s.arch_val_fraction if s.strategy == "bilevel" else None,
            progress=ctx.is_main)
        torch.manual_seed(cfg.run.seed)                       # identical initial weights on all ranks
        self.supernet = Supernet(cfg.model).to(self.device)
        self.arch_params = self.supernet.arch_parameters()
        self.ctx.broadcast_([p.data for p in self.supernet.parameters()])   # before DeepSpeed copies them
        self.opt = SearchOptimizers(self.supernet, self.supernet.weight_parameters(), self.arch_params,
                                    cfg, ctx, ARCH_NAMES)
        self.weights = self.opt.weights
        if s.strategy == "random":         # PNFS' baseline: a fixed random architecture
            self.supernet.sampling = "argmax"
        self.supernet.use_latency_table(self.latency_table)
        self.loss = PoseLoss(cfg.loss)

    # ---- architecture ------------------------------------------------------ #
    def tau(self, epoch: int, step: int, steps: int) -> float:
        s = self.cfg.search
        return gumbel_tau((epoch + step / max(steps, 1)) / max(s.epochs, 1), s.tau_start, s.tau_end)

    # ---- the loop's hooks ---------------------------------------------------- #
    def epoch_batches(self, epoch: int) -> tuple[Iterable[Any], int]:
        self.data.train.set_epoch(epoch)
        n = steps_per_epoch(len(self.data.train), self.cfg.search.max_steps_per_epoch)
        if self.data.arch is None:
            return take(self.data.train, n), n
        return take(zip(self.data.train, cycle_epochs(self.data.arch, epoch)), n), n

    def forward_loss(self, batch: dict, epoch: int, tau: float, seed: int):
        """Supernet forward on ``batch`` (a prepared loader batch) with the architecture drawn
        from ``seed`` at temperature ``tau``; returns ``(total loss, terms, SupernetOutput)``."""
        images = batch["image"]
        with self.weights.autocast():
            out = self.supernet(images, tau=tau, seed=seed)
            teacher_feats = self.teacher.features(images) if self.teacher is not None else None
            total, terms = self.loss(out.exits, batch, step=self.global_step, gflops=out.gflops,
                                     latency=out.latency, epoch=epoch, student_feats=out.cell_outputs,
                                     teacher_feats=teacher_feats)
        return total, terms, out

    def train_step(self, batch: Any, epoch: int, step: int) -> dict[str, float]:
        steps = len(self.data.train)
        tau = self.tau(epoch, step, steps)
        scalars: dict[str, float] = {"tau": tau}
        if self.opt.bilevel:
            train_batch, arch_batch = batch
            arch_batch = self.data.prepare(arch_batch)
            total, terms, _ = self.forward_loss(arch_batch, epoch, tau,
                                                 step_seed(self.cfg.run.seed, self.global_step, 1))
            self.opt.arch_step(total)
            scalars["arch/total"] = float(terms["total"])
        else:
            train_batch = batch
        train_batch = self.data.prepare(train_batch)
        with self.opt.weights_only():
            total, terms, out = self.forward_loss(train_batch, epoch, tau,
                                                   step_seed(self.cfg.run.seed, self.global_step, 0))
            self.weights.step(total)
        scalars.update({k: float(v) for k, v in terms.items() if "/" not in k})
        scalars.update(gflops=float(out.gflops.detach()), images=float(train_batch["image"].shape[0]),
                       lr=self.weights.lr(), arch_lr=self.opt.arch_lr())
        if out.latency is not None:
            scalars["latency_ms"] = float(out.latency.detach())
        return scalars

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.opt.end_epoch(epoch)
        self.opt.check_in_sync(epoch, self.global_step)
        metrics = self.derived_costs()
        if self.ctx.is_main:
            self.run_dir.write_arch_snapshot(f"epoch_{epoch + 1:03d}", self.arch_snapshot())
            if self.cfg.run.val_ap_images:
                metrics.update(self.validate())
        return metrics

    def validate(self) -> dict[str, float]:
        """AP of the current argmax architecture on the val subset."""
        net, mode = self.supernet, self.supernet.sampling
        net.eval()
        net.sampling = "argmax"
        try:
            def exit_fn(x):
                last = net(x, tau=1.0).exits[-1]
                return last.heatmaps, last.tags
            stats = validation_ap(exit_fn, self.data, self.cfg.infer, self.cfg.run.val_ap_images)
        finally:
            net.sampling = mode
            net.train()
        return {"AP": stats["AP"], "AR": stats["AR"], "people": stats["people"]}

    def derived_costs(self) -> dict[str, float]:
        """``gflops_argmax``: GFLOPs (multiply-adds) of the current argmax architecture at the
        training input size; with a latency table also ``latency_ms_argmax``, its predicted ms."""
        genotype = self.supernet.derive()
        size = self.cfg.data.input_size
        net = DerivedNet(genotype, self.cfg.model.num_joints, self.cfg.model.stem_blocks)
        out = {"gflops_argmax": net.exit_gflops((size, size))[genotype.layers]}
        if self.latency_table is not None:
            out["latency_ms_argmax"] = net.exit_costs(self.latency_table, (size, size))[genotype.layers]
        return out

    def arch_snapshot(self) -> dict[str, Any]:
        return {"genotype": self.supernet.derive().to_dict(),
                **{name: p.detach().cpu().tolist() for name, p in
                   zip(ARCH_NAMES, self.arch_params)}}

    def network(self) -> torch.nn.Module:
        return self.supernet

    def stateful(self) -> dict[str, Any]:
        return self.opt.stateful()

    def finish(self) -> dict[str, Path]:
        self.opt.save_rank_arch(self.run_dir, self.global_step)
        if not self.ctx.is_main:
            return {}
        genotype = self.supernet.derive()
        genotype_path = self.run_dir.artifact("genotype.json")
        genotype.save(genotype_path)
        size = self.cfg.data.input_size
        profile = {"input_size": size, **profile_genotype(genotype, (size, size), self.cfg.model.num_joints,
                                                          self.cfg.model.stem_blocks, self.latency_table)}
        return {"genotype": genotype_path, "profile": self.run_dir.write_json("profile.json", profile)}


def load_latency_table(cfg: Config, device: torch.device) -> Optional[LatencyTable]:
    """The latency table of ``loss.cost`` (None for the GFLOPs metric), checked against the
    config's fabric, its ``data.input_size`` and the run's ``device`` (or ``target_device``)."""
    cost = cfg.loss.cost
    if cost.metric != "latency":
        return None
    table = LatencyTable.load(cost.lut)
    size = cfg.data.input_size
    table.check_fabric(cfg.model, cfg.model.stem_blocks, cfg.model.num_joints, cfg.model.ops)
    table.check_input_size((size, size))
    table.check_device(device, cost.target_device)
    return table


# --------------------------------------------------------------------------- #
@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    if (pnfs := pnfs_main("search", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    args = job_arguments("threempose.search", __doc__.split("\n\n")[0]).parse_args(argv)
    return run_job(args, "search", SearchJob)


if __name__ == "__main__":
    sys.exit(main())
