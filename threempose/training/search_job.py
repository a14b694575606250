"""The architecture search job (thesis §3.2-3.4, §4.1 "Searching"): :class:`SearchJob`.

Strategies, DeepSpeed and the per-rank architecture checks are described in
:mod:`threempose.search`, the command that runs this job."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from threempose.config import Config
from threempose.data.loader import build_loaders
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.launch import cycle_epochs, steps_per_epoch, take
from threempose.kernels import set_backend
from threempose.measure.profile import profile_genotype
from threempose.nas.checkpointing import run_checkpoint_fn
from threempose.nas.derived import DerivedNet
from threempose.nas.dyn_egs import gumbel_tau, step_seed
from threempose.nas.latency_table import LatencyTable
from threempose.nas.supernet import Supernet
from threempose.training.losses import PoseLoss
from threempose.training.search_optim import SearchOptimizers
from threempose.training.teacher import Teacher, build_teacher
from threempose.training.validate import validation_ap

ARCH_NAMES = ("alpha", "beta", "m_alpha", "m_beta")


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
        self.supernet.use_activation_checkpointing(run_checkpoint_fn(cfg, ctx.launched))
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
        return metrics

    def validation_metrics(self, epoch: int) -> dict[str, float]:
        """AP of the current argmax architecture on the val subset (after the epoch's checkpoint)."""
        if not (self.ctx.is_main and self.cfg.run.val_ap_images):
            return {}
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
        return {k: stats[k] for k in ("AP", "AR", "people", "skipped")}

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
    table.check_precision(cost.target_precision)
    return table
