"""Training the derived network of a genotype (thesis §4.1 "Training"): :class:`TrainJob`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from threempose.config import Config, config_to_dict
from threempose.data.loader import build_loaders
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.launch import steps_per_epoch, take
from threempose.engine.weights import train_optimizer
from threempose.kernels import set_backend
from threempose.measure.profile import profile_network
from threempose.nas.checkpointing import run_checkpoint_fn
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype
from threempose.nas.model_file import save_model_file
from threempose.training.losses import PoseLoss
from threempose.training.validate import validation_ap

GENOTYPE_FILE = "genotype.json"


class TrainJob(EpochJob):
    """Training one genotype's derived network (see the module docstring)."""

    kind = "train"

    def __init__(self, cfg: Config, ctx: DistContext, genotype: Genotype):
        super().__init__(cfg, ctx, cfg.train.epochs)
        set_backend(cfg.run.kernels)
        self.genotype = genotype
        self.data = build_loaders(cfg.data, seed=cfg.run.seed, device=ctx.device, rank=ctx.rank,
                                  world_size=ctx.world_size, progress=ctx.is_main)
        torch.manual_seed(cfg.run.seed)
        self.net = DerivedNet(genotype, cfg.model.num_joints, cfg.model.stem_blocks).to(ctx.device)
        self.net.use_activation_checkpointing(run_checkpoint_fn(cfg, ctx.launched))
        self.loss = PoseLoss(dataclasses.replace(cfg.loss, flops_weight=0.0, teacher_weight=0.0))
        self.weights, self.scheduler = train_optimizer(self.net, cfg, ctx)

    def open_run_dir(self, resume: Optional[str]):
        run_dir = super().open_run_dir(resume)
        self.pin_input(run_dir, GENOTYPE_FILE, self.genotype, Genotype.load, "--genotype")
        return run_dir

    def epoch_batches(self, epoch: int) -> tuple[Iterable[Any], int]:
        self.data.train.set_epoch(epoch)
        n = steps_per_epoch(len(self.data.train), self.cfg.train.max_steps_per_epoch)
        return take(self.data.train, n), n

    def train_step(self, batch: Any, epoch: int, step: int) -> dict[str, float]:
        batch = self.data.prepare(batch)
        with self.weights.autocast():
            exits = self.weights.model(batch["image"])
            total, terms = self.loss(exits, batch, step=self.global_step)
        self.weights.step(total)
        return {**{k: float(v) for k, v in terms.items() if "/" not in k},
                "images": float(batch["image"].shape[0]), "lr": self.weights.lr()}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.scheduler.step()
        return {}

    def validation_metrics(self, epoch: int) -> dict[str, float]:
        """AP/AR of the trained network on the val subset (after the epoch's checkpoint)."""
        if not (self.ctx.is_main and self.cfg.run.val_ap_images):
            return {}
        self.net.eval()
        try:
            def exit_fn(x):
                last = self.net(x)[-1]
                return last.heatmaps, last.tags
            stats = validation_ap(exit_fn, self.data, self.cfg.infer, self.cfg.run.val_ap_images)
        finally:
            self.net.train()
        return {k: stats[k] for k in ("AP", "AR", "people", "skipped")}

    def network(self) -> torch.nn.Module:
        return self.net

    def stateful(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler}

    def finish(self) -> dict[str, Path]:
        if not self.ctx.is_main:
            return {}
        model_path = save_model_file(self.run_dir.artifact("model.pt"), self.net,
                                     config_to_dict(self.cfg)["infer"])
        size = self.cfg.data.input_size
        profile = {"input_size": size, **profile_network(self.net, (size, size))}
        return {"model": model_path, "profile": self.run_dir.write_json("profile.json", profile)}
