"""One directory per run: config, metrics, TensorBoard, checkpoints, arch snapshots, artifacts.

Layout::

    <run.out_dir>/<run.name>-<YYYYmmdd-HHMMSS>/
        config.json          the resolved config (loadable with load_config)
        metrics.jsonl        one JSON object per log call (MetricsLogger)
        tensorboard/         SummaryWriter event files (MetricsLogger)
        checkpoints/last.pt  newest checkpoint (resume point)
        checkpoints/epoch_NNN.pt  end-of-epoch checkpoints
        arch/                alpha/beta/m snapshots
        <artifacts>          genotype.json, profile.json, ...

In a multi-process run only rank 0 creates the directory and writes to it; it
shares ``RunDir.path`` with the other ranks, which may open it with ``RunDir(path)``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from threempose.config import Config, config_to_dict
from threempose.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from threempose.util.errors import UserError
from threempose.util.files import atomic_open, atomic_write_json, remove_stale_temporaries

# Config keys that may change between a run and its resumption (dotted paths). The loader's
# worker count does not change results; a different run.threads does (EpochJob warns).
RESUME_IGNORED_KEYS = frozenset({"run.progress", "run.out_dir", "run.threads", "data.num_workers"})


class RunDirError(UserError, RuntimeError):
    """A run directory is missing, incomplete, or belongs to a different config."""


class RunDir:
    """Paths and writers of one run directory (see the module docstring for the layout)."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- creation ----------------------------------------------------------- #
    @classmethod
    def create(cls, cfg: Config, path: Optional[str | os.PathLike] = None) -> "RunDir":
        """Make a new run directory and write ``config.json``.

        ``path`` defaults to ``cfg.run.out_dir / f"{cfg.run.name}-{timestamp}"``
        (with ``-1``, ``-2``, ... appended if that name is taken). An explicit
        ``path`` must not exist yet or be an empty directory.
        """
        if path is None:
            base = Path(cfg.run.out_dir).expanduser() / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target, n = base, 0
            while True:
                try:
                    target.mkdir(parents=True)
                    break
                except FileExistsError:
                    n += 1
                    target = base.with_name(f"{base.name}-{n}")
        else:
            target = Path(path).expanduser()
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise RunDirError(f"run directory {target} already exists and is not empty; "
                                  f"pass --resume {target} to continue it, or choose another path")
            target.mkdir(parents=True, exist_ok=True)
        run = cls(target)
        for sub in (run.checkpoints_dir, run.arch_dir):
            sub.mkdir(exist_ok=True)
        atomic_write_json(run.config_path, config_to_dict(cfg))
        return run

    @classmethod
    def open_for_resume(cls, path: str | os.PathLike, cfg: Config,
                        ignored: frozenset[str] = RESUME_IGNORED_KEYS) -> "RunDir":
        """Open an existing run directory, checking that it was made by ``cfg``.

        Keys in ``ignored`` (dotted, e.g. ``"run.progress"``) may differ.
        Raises :class:`RunDirError` naming the first differing key.
        """
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"resume directory {run.path} does not exist")
        if not run.config_path.is_file():
            raise RunDirError(f"resume directory {run.path} has no {cls.CONFIG}; "
                              f"it is not a threempose run directory")
        stored = run.stored_config()
        current = json.loads(json.dumps(config_to_dict(cfg)))     # same JSON normalisation
        diffs = [k for k in _diff_keys(_flatten(stored), _flatten(current)) if k not in ignored]
        if diffs:
            a, b = _flatten(stored), _flatten(current)
            k = diffs[0]
            more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:4])}{', ...' if len(diffs) > 4 else ''})" \
                if len(diffs) > 1 else ""
            raise RunDirError(
                f"resume directory {run.path} was made by a different config: key {k} differs "
                f"({_show(a, k)} vs {_show(b, k)}){more}; resume with the run's own "
                f"{run.config_path} or start a new run")
        for sub in (run.checkpoints_dir, run.arch_dir):
            sub.mkdir(exist_ok=True)
        for folder in (run.path, run.checkpoints_dir, run.arch_dir):     # left by a killed write
            remove_stale_temporaries(folder)
        return run

    def stored_config(self) -> dict[str, Any]:
        """The run's ``config.json`` as a dict."""
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"resume directory {self.path}: {self.CONFIG} is not valid JSON: {e}") from None

    # -- paths ------------------------------------------------------------- #
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def arch_dir(self) -> Path:
        return self.path / "arch"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / "last.pt"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """``checkpoints/epoch_NNN.pt`` for ``epoch`` (from 0)."""
        return self.checkpoints_dir / f"epoch_{epoch:03d}.pt"

    def artifact(self, name: str) -> Path:
        """Path of a final artifact (e.g. ``"genotype.json"``) at the run's top level."""
        if Path(name).name != name:
            raise ValueError(f"artifact name must be a plain file name, got {name!r}")
        return self.path / name

    def epoch_checkpoints(self) -> list[Path]:
        """The ``epoch_NNN.pt`` files, newest first."""
        return sorted(self.checkpoints_dir.glob("epoch_[0-9][0-9][0-9]*.pt"), reverse=True)

    @property
    def has_checkpoint(self) -> bool:
        return self.last_checkpoint.is_file() or bool(self.epoch_checkpoints())

    # -- writers ----------------------------------------------------------- #
    def save_checkpoint(self, state: dict[str, Any], epoch: Optional[int] = None) -> Path:
        """Write ``state`` to ``last.pt`` atomically; with ``epoch``, also to ``epoch_NNN.pt``.

        The epoch file is written once and ``last.pt`` becomes a hard link to
        it (a copy where links are unsupported), swapped in by rename.
        Returns the path of ``last.pt``.
        """
        if epoch is None:
            return save_checkpoint(self.last_checkpoint, state)
        epoch_path = save_checkpoint(self.epoch_checkpoint(epoch), state)
        tmp = self.checkpoints_dir / ".last.pt.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(epoch_path, tmp)
            os.replace(tmp, self.last_checkpoint)
        except OSError:
            tmp.unlink(missing_ok=True)
            with open(epoch_path, "rb") as src, atomic_open(self.last_checkpoint, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return self.last_checkpoint

    def load_last_checkpoint(self, map_location: Any = "cpu", required=()) -> dict[str, Any]:
        """Load ``checkpoints/last.pt`` (see :func:`~threempose.engine.checkpoint.load_checkpoint`)."""
        return load_checkpoint(self.last_checkpoint, map_location=map_location, required=required)

    def load_resume_checkpoint(self, map_location: Any = "cpu", required=()) -> tuple[dict[str, Any], Path]:
        """The newest intact checkpoint: ``last.pt``, or when it is missing or unreadable (a
        damaged disk, a copy cut short) the newest ``epoch_NNN.pt`` that loads.

        Returns ``(state, path)``; raises :class:`CheckpointError` naming every file tried."""
        errors = []
        for path in [self.last_checkpoint, *self.epoch_checkpoints()]:
            if path.is_file():
                try:
                    return load_checkpoint(path, map_location=map_location, required=required), path
                except CheckpointError as e:
                    errors.append(str(e))
        tried = "; ".join(errors) if errors else f"no checkpoint in {self.checkpoints_dir}"
        raise CheckpointError(f"cannot resume {self.path}: {tried}")

    def write_json(self, name: str, obj: Any) -> Path:
        """Write a JSON artifact atomically at the run's top level; return its path."""
        path = self.artifact(name)
        atomic_write_json(path, obj)
        return path

    def write_arch_snapshot(self, tag: str, obj: Any) -> Path:
        """Write ``arch/<tag>.json`` (e.g. alpha/beta/m as nested lists) atomically."""
        if Path(tag).name != tag:
            raise ValueError(f"arch snapshot tag must be a plain name, got {tag!r}")
        path = self.arch_dir / f"{tag}.json"
        atomic_write_json(path, obj, indent=None)
        return path

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


_ABSENT = object()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


def _show(flat: dict[str, Any], key: str) -> str:
    return "absent" if key not in flat else json.dumps(flat[key])
