"""Train the network of a genotype (thesis §4.1 "Training").

    python -m threempose.train --config configs/train-small.json --genotype runs/.../genotype.json
    deepspeed threempose/train.py --config configs/train.json --genotype G.json
    python -m threempose.train --config ... --genotype G.json --resume runs/train-...

The derived network (only the genotype's ops and paths, its EELs and heads) is trained
with Adam (``train.lr``, decayed by ``train.lr_gamma`` at ``train.lr_milestones``), the
heatmap and grouping losses on every exit (``loss.heatmap_weight``,
``loss.grouping_weight``; the FLOPs and teacher terms belong to the search and are not
used here). The run directory gets the genotype, a checkpoint every epoch, metrics and
at the end ``model.pt`` (what ``threempose.infer`` loads) and ``profile.json``.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `deepspeed threempose/train.py`: import the installed package, not this folder's modules.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import dataclasses
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from threempose.cli import entry_point
from threempose.config import Config, config_to_dict
from threempose.data.loader import build_loaders
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.launch import job_arguments, run_job, steps_per_epoch, take
from threempose.engine.run_dir import RunDirError
from threempose.engine.validate import validation_ap
from threempose.engine.weights import WeightOptimizer
from threempose.kernels import set_backend
from threempose.losses import PoseLoss
from threempose.model_file import save_model_file
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype
from threempose.pnfs.dispatch import pnfs_main
from threempose.profile import profile_network

GENOTYPE_FILE = "genotype.json"


class TrainJob(EpochJob):
    """Training one genotype's derived network (see the module docstring)."""

    kind = "train"

    def __init__(self, cfg: Config, ctx: DistContext, genotype: Genotype):
        super().__init__(cfg, ctx, cfg.train.epochs)
        t = cfg.train
        set_backend(cfg.run.kernels)
        self.genotype = genotype
        self.data = build_loaders(cfg.data, seed=cfg.run.seed, device=ctx.device, rank=ctx.rank,
                                  world_size=ctx.world_size, progress=ctx.is_main)
        torch.manual_seed(cfg.run.seed)
        self.net = DerivedNet(genotype, cfg.model.num_joints, cfg.model.stem_blocks).to(ctx.device)
        self.loss = PoseLoss(dataclasses.replace(cfg.loss, flops_weight=0.0, teacher_weight=0.0))
        self.weights = WeightOptimizer(self.net, [{"params": list(self.net.parameters()), "lr": t.lr}],
                                       cfg, ctx, grad_clip=t.grad_clip)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.weights.optimizer, t.lr_milestones,
                                                              t.lr_gamma)

    def open_run_dir(self, resume: Optional[str]):
        run_dir = super().open_run_dir(resume)
        saved = run_dir.artifact(GENOTYPE_FILE)
        if self.ctx.is_main:
            if resume and saved.is_file() and Genotype.load(saved).to_dict() != self.genotype.to_dict():
                raise RunDirError(f"{run_dir.path} trained a different genotype than the one given; "
                                  f"pass --genotype {saved}")
            self.genotype.save(saved)
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
        return {"AP": stats["AP"], "AR": stats["AR"], "people": stats["people"]}

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


@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    if (pnfs := pnfs_main("train", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    parser = job_arguments("threempose.train", __doc__.split("\n\n")[0])
    parser.add_argument("--genotype", required=True, help="genotype JSON (a search's genotype.json)")
    args = parser.parse_args(argv)
    genotype = Genotype.load(args.genotype)
    return run_job(args, "train", lambda cfg, ctx: TrainJob(cfg, ctx, genotype))


if __name__ == "__main__":
    sys.exit(main())
