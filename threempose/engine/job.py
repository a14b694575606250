"""The epoch loop shared by search and training.

:class:`EpochJob` owns what every run does the same way: the run directory
(created by rank 0 and shared with the other ranks), resuming from its last
checkpoint, the progress bar, metrics every ``run.log_every`` steps, a NaN
guard (the loss raises :class:`~threempose.training.losses.NonFiniteLossError`), and a
checkpoint at the end of every epoch. A job (``SearchJob``, ``TrainJob``)
provides the model-specific parts:

* :meth:`epoch_batches` - the batches of one epoch (their order depends only on
  the seed and the epoch, so a resumed epoch sees the same data);
* :meth:`train_step` - one optimisation step, returning scalars to log;
* :meth:`end_epoch` - scheduler steps and snapshots after an epoch (part of its checkpoint);
* :meth:`validation_metrics` - validation metrics, computed after the epoch's checkpoint is written, so
  that nothing that happens in validation loses the epoch's training;
* :meth:`network` and :meth:`stateful` - what a checkpoint holds besides the loop's own
  state (the weight optimizer ``self.weights`` is always saved);
* :meth:`finish` - the final artifacts (genotype, profile, weights).

Checkpoints are taken at epoch boundaries: a run killed mid-epoch resumes at
the start of that epoch with every RNG, optimizer and scheduler restored, and
so ends exactly as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import abc
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
import torch.distributed as dist

from threempose.config import Config
from threempose.engine.checkpoint import CheckpointWriteError
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import MetricsLogger
from threempose.engine.progress import EpochProgress, progress_enabled
from threempose.engine.run_dir import RunDir, RunDirError
from threempose.engine.seeding import capture_rng_state, restore_rng_state, seed_everything
from threempose.util.cli import note_resumable
from threempose.util.errors import write_failure


class EpochJob(abc.ABC):
    """Template of a resumable, multi-rank epoch loop (see the module docstring)."""

    kind = "job"                     # "search" or "train"; stored in checkpoints
    # Step scalars whose epoch mean the end-of-epoch line shows, and under what name (what moves
    # while the val AP may still be 0: the loss, the sampled architecture's GFLOPs).
    epoch_means: ClassVar[dict[str, str]] = {"heatmap": "heatmap loss", "gflops": "sampled GFLOPs"}

    def __init__(self, cfg: Config, ctx: DistContext, epochs: int):
        self.cfg, self.ctx, self.epochs = cfg, ctx, epochs
        self.epoch = 0               # next epoch to run
        self.global_step = 0
        self.run_dir: Optional[RunDir] = None
        self.run_path: Optional[Path] = None   # a new run's directory; None: <out_dir>/<name>-<stamp>
        self.metrics: Optional[MetricsLogger] = None

    # ---- to be provided by a job ------------------------------------------ #
    @abc.abstractmethod
    def epoch_batches(self, epoch: int) -> tuple[Iterable[Any], int]:
        """``(batches, number of batches)`` of ``epoch``."""

    @abc.abstractmethod
    def train_step(self, batch: Any, epoch: int, step: int) -> dict[str, float]:
        """One step; returns scalars to log, with ``"images"`` (images processed)."""

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """After ``epoch``, before its checkpoint: state changes (scheduler steps, snapshots);
        returns scalars to log with the validation metrics (by rank 0)."""
        return {}

    def validation_metrics(self, epoch: int) -> dict[str, float]:
        """After ``epoch``'s checkpoint is written: validation metrics to log (by rank 0). It
        must not change the state a resume restores (the checkpoint is already written)."""
        return {}

    @abc.abstractmethod
    def network(self) -> torch.nn.Module:
        """The module whose weights the run trains (saved as ``model`` in checkpoints)."""

    def stateful(self) -> dict[str, Any]:
        """Other objects with ``state_dict``/``load_state_dict`` a resume needs (schedulers,
        an architecture optimizer), by checkpoint key; None entries are skipped."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The network, its weight optimizer (``self.weights``) and :meth:`stateful`."""
        return {"model": self.network().state_dict(), "weights": self.weights.state_dict(),
                **{k: v.state_dict() if v is not None else None for k, v in self.stateful().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network().load_state_dict(state["model"])
        self.weights.load_state_dict(state["weights"], self.run_dir, int(state["epoch"]))
        for key, obj in self.stateful().items():
            if obj is not None:
                obj.load_state_dict(state[key])

    def save_collective(self, epoch: int) -> None:
        """Called on every rank before rank 0 writes the epoch checkpoint (DeepSpeed's
        sharded optimizer state is saved here, by all ranks together)."""
        self.weights.save_collective(self.run_dir, epoch)

    def finish(self) -> dict[str, Path]:
        """Write final artifacts; returns ``{name: path}`` to report."""
        return {}

    # ---- the loop --------------------------------------------------------- #
    def open_run_dir(self, resume: Optional[str]) -> RunDir:
        """Create (or reopen for ``--resume``) the run directory on rank 0; share its path."""
        path = None
        if self.ctx.is_main:
            run_dir = (RunDir.open_for_resume(resume, self.cfg) if resume
                       else RunDir.create(self.cfg, self.run_path))
            path = str(run_dir.path)
            if resume:
                self.warn_thread_change(run_dir)
        if self.ctx.world_size > 1:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        return RunDir(path)

    def pin_input(self, run_dir: RunDir, name: str, given: Any, load: Callable[[Path], Any], option: str) -> None:
        """Keep a training run's fixed input (a genotype, a PNFS architecture) as the artifact
        ``name`` of ``run_dir``; a ``--resume`` with a different one is a :class:`RunDirError`
        naming the saved file for ``option``. ``given`` and ``load(path)`` have ``to_dict``
        and ``save(path)``. Rank 0 only (it alone writes the run directory)."""
        if not self.ctx.is_main:
            return
        saved = run_dir.artifact(name)
        if saved.is_file() and load(saved).to_dict() != given.to_dict():
            raise RunDirError(f"{run_dir.path} trained a different {name.split('.')[0]} than the one given; "
                              f"pass {option} {saved}")
        given.save(saved)

    def warn_thread_change(self, run_dir: RunDir) -> None:
        """Say so when this continuation of ``run_dir`` runs with another intra-op thread count
        than the run recorded (floating-point sums then differ: not bit-identical)."""
        recorded = run_dir.stored_config().get("run", {}).get("threads")
        if recorded and recorded != self.cfg.run.threads:
            self.say(f"[threempose] warning: {run_dir.path} ran with {recorded} intra-op thread(s), this "
                     f"continuation uses {self.cfg.run.threads}; it will not be bit-identical to an "
                     f"uninterrupted run (set run.threads or OMP_NUM_THREADS={recorded} to match)")

    def full_state(self) -> dict[str, Any]:
        """The job's state plus the loop's own (epoch, step, RNG)."""
        return {"kind": self.kind, "epoch": self.epoch, "global_step": self.global_step,
                "step_in_epoch": 0, "rng": capture_rng_state(), **self.state_dict()}

    def resume_from(self, run_dir: RunDir) -> None:
        state, path = run_dir.load_resume_checkpoint(required=("kind", "epoch", "global_step", "rng"))
        if path != run_dir.last_checkpoint:
            self.say(f"[threempose] {run_dir.last_checkpoint} is missing or unreadable; "
                     f"resuming from {path} instead")
        if state["kind"] != self.kind:
            raise RunDirError(f"{path} is a {state['kind']} checkpoint, not a {self.kind} one")
        self.load_state_dict(state)
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        restore_rng_state(state["rng"])

    def log(self, **scalars: float) -> None:
        if self.metrics is not None:
            self.metrics.log(self.global_step, **scalars)

    def say(self, message: str) -> None:
        """A line of progress output on rank 0 (stderr, so stdout stays machine-readable)."""
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    def run(self, resume: Optional[str] = None) -> dict[str, Path]:
        """Run (or resume) all epochs; return the artifacts of :meth:`finish`."""
        seed_everything(self.cfg.run.seed)   # the same on every rank
        self.run_dir = self.open_run_dir(resume)
        note_resumable(self.run_dir.path)       # Ctrl-C names it
        resumed = resume is not None and self.run_dir.has_checkpoint
        if resume is not None and self.ctx.world_size > 1:
            seen = int(self.ctx.all_reduce_sum(float(resumed)))   # every rank decides alike
            if seen not in (0, self.ctx.world_size):
                raise RunDirError(f"--resume: {seen} of {self.ctx.world_size} ranks see "
                                  f"{self.run_dir.last_checkpoint}; put the run directory on a "
                                  f"filesystem that every node shares (same path) to resume")
        if resumed:
            self.resume_from(self.run_dir)
            if self.epoch >= self.epochs:
                self.say(f"[threempose] {self.run_dir.path} already ran all {self.epochs} epochs; "
                         f"writing its final artifacts again")
            else:
                self.say(f"[threempose] resuming {self.run_dir.path} at epoch {self.epoch + 1}/{self.epochs}")
        elif resume is not None:
            self.say(f"[threempose] {self.run_dir.path} has no checkpoint yet; starting it over")
        else:
            self.say(f"[threempose] {self.kind} run directory: {self.run_dir.path}")
        # Lines logged after the checkpoint (by the killed run) are dropped; they are re-run. A run
        # killed before its first checkpoint starts over: all its lines and events go.
        self.metrics = MetricsLogger(self.run_dir, rank=self.ctx.rank,
                                     purge_from_step=(self.global_step + 1 if resumed
                                                      else 0 if resume is not None else None))
        show_bar = progress_enabled(self.cfg.run.progress, self.ctx.rank)
        try:
            while self.epoch < self.epochs:
                seconds, images, means, scalars = self._run_epoch(show_bar)
                self.epoch += 1
                self.save_collective(self.epoch)
                if self.ctx.is_main:
                    self._save_checkpoint()
                val = self.validation_metrics(self.epoch - 1)      # after the checkpoint: never loses it
                self._report_epoch(self.epoch - 1, seconds, images, means, {**scalars, **val})
                self.ctx.barrier()
            return self.finish()
        finally:
            self.metrics.close()

    def _save_checkpoint(self) -> None:
        """Write the epoch's checkpoint; a write the disk refuses stops the run with one line
        (:class:`CheckpointWriteError`); the previous checkpoint stays whole and resumable."""
        try:
            self.run_dir.save_checkpoint(self.full_state(), epoch=self.epoch)
        except Exception as e:
            failure = write_failure(e)
            if failure is None:
                raise
            raise CheckpointWriteError(
                f"cannot write {failure.filename or 'the checkpoint'}: {failure.strerror}; epoch "
                f"{self.epoch} is lost, the earlier checkpoints are intact: free space and resume "
                f"with --resume {self.run_dir.path}") from e

    def _run_epoch(self, show_bar: bool) -> tuple[float, int, dict[str, float], dict[str, float]]:
        """Train one epoch and end it: ``(seconds, images, epoch means, end_epoch's scalars)``; the
        means are those of :attr:`epoch_means`, by display name."""
        epoch = self.epoch
        batches, n = self.epoch_batches(epoch)
        started = time.perf_counter()
        images = 0
        sums: dict[str, float] = {}
        steps = 0
        with EpochProgress(epoch, self.epochs, n, enabled=show_bar) as bar:
            for step, batch in enumerate(batches):
                scalars = self.train_step(batch, epoch, step)
                self.global_step += 1
                steps += 1
                images += int(scalars.get("images", 0))
                for key in self.epoch_means:
                    if key in scalars:
                        sums[key] = sums.get(key, 0.0) + float(scalars[key])
                bar.update(int(scalars.get("images", 0)), scalars, scalars.get("gflops"))
                if self.global_step % self.cfg.run.log_every == 0 or step == n - 1:
                    self.log(epoch=epoch, images_per_s=bar.images_per_second(), **scalars)
        seconds = time.perf_counter() - started
        means = {self.epoch_means[k]: v / max(steps, 1) for k, v in sums.items()}
        return seconds, images, means, self.end_epoch(epoch)

    def _report_epoch(self, epoch: int, seconds: float, images: int, means: dict[str, float],
                      val: dict[str, float]) -> None:
        """Log ``epoch``'s end and validation scalars and print its summary line."""
        if val:
            self.log(epoch=epoch, **{f"val/{k}": v for k, v in val.items()})
        summary = ", ".join(f"{k} {v:.4g}" for k, v in {**means, **val}.items())
        self.say(f"[threempose] epoch {epoch + 1}/{self.epochs} done in {seconds:.1f} s "
                 f"({images * self.ctx.world_size / max(seconds, 1e-9):.1f} images/s)"
                 + (f": {summary}" if summary else ""))
