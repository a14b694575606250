"""PNFS search and training runs on the shared resumable epoch loop (:class:`~threempose.engine.job.EpochJob`).

:class:`PnfsSearchJob` (PNFS §III-F; ``search.strategy``):

* ``synchronous`` — PNFS' main strategy: one Adam over the weights and every fabric's alpha and
  beta (and m), all updated by the gradient of the training loss in one step. Weights at
  ``search.weight_lr``, architecture parameters at ``search.arch_lr``.
* ``bilevel`` — first order (DARTS, PNFS Table II "first-order gradient-based"): each step
  updates the architecture parameters on a batch of the held-out part of the train crops
  (``search.arch_val_fraction``) with their own Adam, then the weights on a train batch.
* ``random`` — PNFS' baseline: alpha / beta / m drawn once from N(0, 1) (seeded) and fixed;
  only the weights train.

Every fabric samples with ``model.sampling``: ``dense`` (PNFS: softmax-weighted sum of every op
and input) or the 3M-Pose samplers ``dyn_egs`` / ``argmax`` (Gumbel temperature from
``search.tau_start`` to ``tau_end``). The weights' learning rate is multiplied by
``pnfs.weight_lr_gamma`` at ``pnfs.weight_lr_milestones``, the architecture's by
``search.arch_lr_gamma`` at ``search.arch_lr_milestones``. PNFS §IV-A decays both by 0.25 at
epochs 90, 120 and 150 (set both milestone lists so); for its COCO model ours-3 (§VI-b, the
model of ``configs/pnfs-coco.json``) it "cancel[s] the learning rate decay for searching the
architecture parameters": there only the weights decay (``search.arch_lr_milestones: []``).
The run ends with ``architecture.json`` (dense: every fabric pruned at ``pnfs.prune_threshold``,
its weights kept, §III-F; otherwise the argmax genotypes), ``model.pt`` (that architecture with
the searched weights: a synchronous dense search needs no retraining) and ``profile.json``.

:class:`PnfsTrainJob` trains a fixed architecture (``--architecture``; from scratch, or from a
model file's weights with ``--init``) with Adam (``train.lr``, ``train.lr_milestones``,
``train.lr_gamma``) and writes ``model.pt`` and ``profile.json``.

Both use PNFS' loss (Eq. 6, :func:`threempose.pnfs.vector_head.pnfs_loss`) on the merged part
scores, log COCO OKS AP on the crops of the first ``run.val_ap_images`` val images after every
epoch (flip test per ``pnfs.topdown.flip_test``), and run under DeepSpeed like the 3M-Pose jobs
(:class:`~threempose.engine.weights.WeightOptimizer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from threempose.config import Config
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.launch import cycle_epochs, steps_per_epoch, take
from threempose.engine.run_dir import RunDir
from threempose.engine.weights import train_optimizer
from threempose.kernels import set_backend
from threempose.nas.dyn_egs import gumbel_tau, step_seed
from threempose.pnfs.model import (
    PnfsArchitecture,
    PnfsNet,
    check_pnfs_config,
    load_pnfs_model,
    profile_pnfs,
    pruned_network,
    save_pnfs_model,
)
from threempose.pnfs.topdown_predict import TopDownLoaders, build_topdown_loaders, validation_ap, validation_pckh
from threempose.pnfs.vector_head import pnfs_loss
from threempose.training.losses import NonFiniteLossError
from threempose.training.search_optim import SearchOptimizers, multistep

ARCHITECTURE_FILE = "architecture.json"


class _TopDownJob(EpochJob):
    """What the PNFS search and train jobs share: data, loss, validation, final artifacts."""

    def __init__(self, cfg: Config, ctx: DistContext, epochs: int, arch_fraction: Optional[float] = None):
        super().__init__(cfg, ctx, epochs)
        check_pnfs_config(cfg)
        set_backend(cfg.run.kernels)
        self.device = ctx.device
        self.data: TopDownLoaders = build_topdown_loaders(cfg, rank=ctx.rank, world_size=ctx.world_size,
                                                          arch_fraction=arch_fraction, progress=ctx.is_main)
        self.crop_hw = (cfg.pnfs.topdown.input_height, cfg.pnfs.topdown.input_width)

    def network(self) -> torch.nn.Module:
        return self.net

    def loss(self, model: Any, batch: dict, tau: float = 1.0, seed: Optional[int] = None) -> torch.Tensor:
        """PNFS Eq. 6 of ``model`` on ``batch`` (a crop batch, moved to the device here)."""
        out = model(batch["image"].to(self.device), tau=tau, seed=seed)
        loss = pnfs_loss(out.scores.float(), batch["target"].to(self.device),
                         batch["target_weight"].to(self.device))
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"non-finite PNFS loss (Eq. 6) at step {self.global_step}: {loss.item()}",
                                     self.global_step, ["pnfs"])
        return loss

    def batches(self, loader, epoch: int, cap: Optional[int]) -> tuple[Iterator[Any], int]:
        loader.sampler.set_epoch(epoch)
        n = steps_per_epoch(len(loader), cap)
        return take(loader, n), n

    def validate(self, net: PnfsNet) -> dict[str, float]:
        """OKS AP/AR of ``net`` on the first ``run.val_ap_images`` val images' crops, or for MPII
        data PCKh@0.5 / @0.1 on the first ``run.val_ap_images`` val people (eval mode; a
        ``dyn_egs`` network is scored with its argmax architecture)."""
        mode, was_training = net.sampling, net.training
        net.eval()
        if mode == "dyn_egs":
            net.sampling = "argmax"
        try:
            if net.dataset == "mpii":
                stats = validation_pckh(lambda x: net(x).scores, self.data, self.cfg.pnfs.topdown,
                                        self.cfg.run.val_ap_images, self.device)
                return {k: stats[k] for k in ("PCKh@0.5", "PCKh@0.1", "crops")}
            stats = validation_ap(lambda x: net(x).scores, self.data, self.cfg.pnfs.topdown,
                                  self.cfg.run.val_ap_images, self.device)
        finally:
            if mode == "dyn_egs":
                net.sampling = mode
            net.train(was_training)
        return {"AP": stats["AP"], "AP50": stats["AP50"], "AR": stats["AR"], "crops": stats["crops"]}

    def validation_metrics(self, epoch: int) -> dict[str, float]:
        """:meth:`validate` of the network (rank 0, when ``run.val_ap_images``), after the epoch's
        checkpoint."""
        if not (self.ctx.is_main and self.cfg.run.val_ap_images):
            return {}
        return self.validate(self.net)

    def write_model(self, net: PnfsNet, extra_profiles: Optional[dict] = None) -> dict[str, Path]:
        """``model.pt`` and ``profile.json`` (params and GFLOPs per crop) of a fixed network."""
        model_path = save_pnfs_model(self.run_dir.artifact("model.pt"), net, self.cfg)
        profile = {"crop": list(self.crop_hw), "model": profile_pnfs(net, self.crop_hw), **(extra_profiles or {})}
        return {"model": model_path, "profile": self.run_dir.write_json("profile.json", profile)}


class PnfsSearchJob(_TopDownJob):
    """A PNFS architecture search (module docstring)."""

    kind = "pnfs-search"

    def __init__(self, cfg: Config, ctx: DistContext):
        s = cfg.search
        super().__init__(cfg, ctx, s.epochs, s.arch_val_fraction if s.strategy == "bilevel" else None)
        torch.manual_seed(cfg.run.seed)                   # identical initial weights on every rank
        self.net = PnfsNet(cfg).to(self.device)
        self.arch_params = self.net.arch_parameters()
        self.ctx.broadcast_([t.data for t in self.net.parameters()])     # before DeepSpeed copies them
        self.opt = SearchOptimizers(self.net, self.net.weight_parameters(), self.arch_params, cfg, ctx,
                                    [f"arch[{i}]" for i in range(len(self.arch_params))])
        self.weights = self.opt.weights

    def epoch_batches(self, epoch: int) -> tuple[Iterable[Any], int]:
        batches, n = self.batches(self.data.train, epoch, self.cfg.search.max_steps_per_epoch)
        if self.data.arch is None:
            return batches, n
        return zip(batches, cycle_epochs(self.data.arch, epoch)), n

    def train_step(self, batch: Any, epoch: int, step: int) -> dict[str, float]:
        s = self.cfg.search
        n = steps_per_epoch(len(self.data.train), s.max_steps_per_epoch)
        tau = gumbel_tau((epoch + step / max(n, 1)) / max(s.epochs, 1), s.tau_start, s.tau_end)
        scalars: dict[str, float] = {"tau": tau}
        if self.opt.bilevel:
            batch, arch_batch = batch
            with self.weights.autocast():
                arch_loss = self.loss(self.net, arch_batch, tau, step_seed(self.cfg.run.seed, self.global_step, 1))
            self.opt.arch_step(arch_loss)
            scalars["arch/loss"] = float(arch_loss.detach())
        with self.opt.weights_only(), self.weights.autocast():
            loss = self.loss(self.weights.model, batch, tau, step_seed(self.cfg.run.seed, self.global_step, 0))
            self.weights.step(loss)
        scalars.update(loss=float(loss.detach()), images=float(batch["image"].shape[0]), lr=self.weights.lr(),
                       arch_lr=self.opt.arch_lr())
        return scalars

    def end_epoch(self, epoch: int) -> dict[str, float]:
        s, p = self.cfg.search, self.cfg.pnfs
        self.weights.set_lr(multistep(s.weight_lr, p.weight_lr_milestones, p.weight_lr_gamma, epoch + 1))
        self.opt.end_epoch(epoch)
        self.opt.check_in_sync(epoch, self.global_step)          # a collective
        if self.ctx.is_main:
            self.run_dir.write_arch_snapshot(f"epoch_{epoch + 1:03d}", self.arch_snapshot())
        return {}

    def arch_snapshot(self) -> dict[str, Any]:
        """Every fabric's normalised weights: ``{"backbone" (fabric backbone only), "parts": [...]}``,
        each ``{"ops", "op_weights" [N, E, K], "path_weights" [N, 3]}`` (the dense softmaxes) and,
        for the 3M-Pose samplers, ``"genotype"`` (the argmax architecture)."""
        def weights(fabric) -> dict[str, Any]:
            with torch.no_grad():
                w = fabric.normalised_weights()
            out = {"ops": fabric.ops, "op_weights": w.op_weights.cpu().tolist(),
                   "path_weights": w.path_weights.cpu().tolist()}
            if fabric.sampling != "dense":
                out["genotype"] = fabric.derive().genotype.to_dict()
            return out
        fabrics = self.net.searchable_fabrics()
        out: dict[str, Any] = {"parts": [weights(part.fabric) for part in self.net.parts]}
        if len(fabrics) > len(self.net.parts):
            out["backbone"] = weights(fabrics[0])
        return out

    def stateful(self) -> dict[str, Any]:
        return self.opt.stateful()

    def finish(self) -> dict[str, Path]:
        self.opt.save_rank_arch(self.run_dir, self.global_step)        # every rank, to compare ranks
        if not self.ctx.is_main:
            return {}
        architecture = self.net.architecture(self.cfg.pnfs.prune_threshold)
        arch_path = architecture.save(self.run_dir.artifact(ARCHITECTURE_FILE))
        searched = pruned_network(self.net, self.cfg, architecture)
        artifacts = self.write_model(searched, {"search_space": profile_pnfs(self.net, self.crop_hw)})
        return {"architecture": arch_path, **artifacts}


class PnfsTrainJob(_TopDownJob):
    """Training one PNFS architecture (module docstring).

    Args:
        architecture: the architecture to build.
        init: a PNFS model file whose weights (same architecture) start the training.
    """

    kind = "pnfs-train"

    def __init__(self, cfg: Config, ctx: DistContext, architecture: PnfsArchitecture, init: Optional[str] = None):
        super().__init__(cfg, ctx, cfg.train.epochs)
        self.architecture = architecture
        torch.manual_seed(cfg.run.seed)
        self.net = PnfsNet(cfg, architecture).to(self.device)
        if init is not None:
            start, _ = load_pnfs_model(init)
            if start.state_dict().keys() != self.net.state_dict().keys():
                raise ValueError(f"--init {init}: its architecture differs from --architecture's; pass the "
                                 f"{ARCHITECTURE_FILE} of the run that wrote it")
            self.net.load_state_dict(start.state_dict())
        self.ctx.broadcast_([p.data for p in self.net.parameters()])      # before DeepSpeed copies them
        self.weights, self.scheduler = train_optimizer(self.net, cfg, ctx)

    def open_run_dir(self, resume: Optional[str]) -> RunDir:
        run_dir = super().open_run_dir(resume)
        self.pin_input(run_dir, ARCHITECTURE_FILE, self.architecture, PnfsArchitecture.load, "--architecture")
        return run_dir

    def epoch_batches(self, epoch: int) -> tuple[Iterable[Any], int]:
        return self.batches(self.data.train, epoch, self.cfg.train.max_steps_per_epoch)

    def train_step(self, batch: Any, epoch: int, step: int) -> dict[str, float]:
        with self.weights.autocast():
            loss = self.loss(self.weights.model, batch)
        self.weights.step(loss)
        return {"loss": float(loss.detach()), "images": float(batch["image"].shape[0]), "lr": self.weights.lr()}

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.scheduler.step()
        return {}

    def stateful(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler}

    def finish(self) -> dict[str, Path]:
        if not self.ctx.is_main:
            return {}
        return self.write_model(self.net)
