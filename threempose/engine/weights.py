"""Stepping the network weights: torch Adam in one process, a DeepSpeed engine under the launcher.

Mixed precision is ``run.amp``: ``bf16``/``fp16`` through ``torch.autocast`` on the run's
device (CUDA or CPU, whose autocast tests use), with a GradScaler for fp16. Under the DeepSpeed
launcher only ``bf16`` is accepted: the engine steps the weights without torch's GradScaler,
so fp16 gradients would underflow unscaled (and DeepSpeed's own fp16 would cast the
architecture parameters, see below). The config's
``deepspeed`` section is handed to DeepSpeed with ``train_micro_batch_size_per_gpu`` set
to ``data.batch_size``, ``gradient_accumulation_steps`` 1 and ``gradient_clipping`` from
the job when the section does not set it. Its own ``fp16``/``bf16`` switches must stay
off: they would cast the architecture parameters too. ZeRO stages 0-2 are supported; stage 3
would partition the architecture parameters (module parameters stepped outside DeepSpeed in a
bilevel search) and is rejected.

Parameters that a step does not use (the ops and paths the sampled architecture leaves out)
have no gradient in one process, and torch's Adam leaves them and their moments alone. Under
DeepSpeed they take part in the gradient reduction as zeros (stage 0 fills ``.grad`` with zeros,
ZeRO 1/2 keep flat gradient partitions), so Adam's moments keep moving them a little: every
rank agrees, but a DeepSpeed run and a one-process run of the same config differ slightly.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from threempose.config import Config, ConfigError
from threempose.engine.distributed import DistContext

DEEPSPEED_DIR = "deepspeed"


def deepspeed_config(cfg: Config, grad_clip: Optional[float]) -> dict[str, Any]:
    """The DeepSpeed config of a run (see the module docstring); rejects its fp16/bf16."""
    ds = dict(cfg.deepspeed)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{cfg.source}: deepspeed.zero_optimization.stage is {stage!r}; use 0, 1 or 2 "
                          f"(stage 3 would partition the architecture parameters)")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"{cfg.source}: deepspeed.{key}.enabled must be false; use run.amp "
                              f"(\"{key}\") for mixed precision, which keeps architecture parameters fp32")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    if grad_clip and "gradient_clipping" not in ds:
        ds["gradient_clipping"] = grad_clip
    return ds


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``run.amp`` -> the autocast dtype (``none``: no autocast)."""


def amp_grad_scaler(amp_dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler on ``device`` for fp16 autocast (small gradients underflow in fp16), else None."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


class WeightOptimizer:
    """Adam over ``param_groups`` of ``module``; ``model`` is what the job calls forward on.

    ``optimizer`` is always the torch Adam (its ``param_groups`` carry the learning rates, so
    a torch LR scheduler can drive it); under DeepSpeed ``engine`` steps it (through its ZeRO
    wrapper for stages 1-2).
    """

    def __init__(self, module: nn.Module, param_groups: list[dict], cfg: Config, ctx: DistContext,
                 grad_clip: Optional[float] = None):
        self.ctx, self.grad_clip = ctx, grad_clip
        self.params = [p for g in param_groups for p in g["params"]]
        self.amp_dtype = AMP_DTYPES.get(cfg.run.amp)
        if self.amp_dtype == torch.float16 and ctx.launched:
            raise ConfigError(f"{cfg.source}: run.amp \"fp16\" is not supported under the DeepSpeed launcher "
                              f"(its engine steps the weights without loss scaling); use \"bf16\"")
        optimizer = torch.optim.Adam(param_groups)
        self.scaler = amp_grad_scaler(self.amp_dtype, ctx.device)
        self.engine = None
        if ctx.launched:
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(
                model=module, optimizer=optimizer, config=deepspeed_config(cfg, grad_clip))
            self.model = self.engine
        else:
            self.model = module
        self.optimizer = optimizer

    def autocast(self):
        """The forward's autocast context on the run's device (a no-op without ``run.amp``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def step(self, loss: torch.Tensor) -> None:
        """Backward ``loss`` into the weights, clip, and take one optimizer step."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def lr(self, group: int = 0) -> float:
        return float(self.optimizer.param_groups[group]["lr"])

    def set_lr(self, value: float, group: int = 0) -> None:
        self.optimizer.param_groups[group]["lr"] = value

    # ---- checkpoints -------------------------------------------------------- #
    def save_collective(self, run_dir, epoch: int) -> None:
        """DeepSpeed: every rank saves its optimizer shard under ``checkpoints/deepspeed``."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(Path(run_dir.checkpoints_dir) / DEEPSPEED_DIR),
                                        tag=f"epoch_{epoch:03d}")

    def state_dict(self) -> dict[str, Any]:
        if self.engine is not None:
            return {"deepspeed": True}      # the shards are in checkpoints/deepspeed/epoch_NNN
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any], run_dir=None, epoch: Optional[int] = None) -> None:
        """Restore; under DeepSpeed from the shards of ``epoch`` in ``run_dir``."""
        if bool(state.get("deepspeed")) != (self.engine is not None):
            raise RuntimeError("the checkpoint was written with%s DeepSpeed; resume it the same way "
                               "(launcher or plain python)" % ("" if state.get("deepspeed") else "out"))
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(Path(run_dir.checkpoints_dir) / DEEPSPEED_DIR),
                                                  tag=f"epoch_{epoch:03d}")
            if path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint epoch_{epoch:03d} under "
                                   f"{run_dir.checkpoints_dir}/{DEEPSPEED_DIR}")
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def train_optimizer(net: nn.Module, cfg: Config, ctx: DistContext) -> tuple[WeightOptimizer, Any]:
    """The optimizer and schedule of a training run (thesis §4.1 "Training"; PNFS' training):
    Adam at ``train.lr`` over every weight of ``net``, clipped at ``train.grad_clip``, decayed by
    ``train.lr_gamma`` at ``train.lr_milestones`` (epochs). Returns ``(weights, scheduler)``."""
    t = cfg.train
    weights = WeightOptimizer(net, [{"params": list(net.parameters()), "lr": t.lr}], cfg, ctx, grad_clip=t.grad_clip)
    return weights, torch.optim.lr_scheduler.MultiStepLR(weights.optimizer, t.lr_milestones, t.lr_gamma)
