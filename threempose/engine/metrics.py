"""Scalar metrics to ``metrics.jsonl`` and TensorBoard, written by rank 0 only.

Each :meth:`MetricsLogger.log` call appends one line
``{"step": int, "time": unix seconds, "<name>": number, ...}`` and the same
scalars to TensorBoard under their names. Non-finite values are written as
``null`` (JSON has no NaN) and skipped in TensorBoard.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Optional

from threempose.engine.run_dir import RunDir
from threempose.util.files import atomic_open, named_write_error


class MetricsLogger:
    """Append-only metrics log of one run.

    Args:
        run_dir: the run's :class:`RunDir` (or its path).
        rank: process rank; every rank but 0 logs nothing and opens no file.
        tensorboard: also write TensorBoard events (the writer is created on
            the first :meth:`log` call).
        purge_from_step: when resuming, the first step that will be run again:
            earlier-written lines with ``step >= purge_from_step`` are dropped
            from ``metrics.jsonl`` and TensorBoard purges its events from there,
            so a resumed run's log equals an uninterrupted one's. ``0`` (a run
            that starts over) also deletes the old TensorBoard event files.
    """

    def __init__(self, run_dir: RunDir | str | os.PathLike, rank: int = 0, tensorboard: bool = True,
                 purge_from_step: Optional[int] = None):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.enabled = rank == 0
        self.tensorboard = tensorboard
        self.purge_from_step = purge_from_step
        self._file = None
        self._writer = None
        if self.enabled:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            if purge_from_step is not None:
                _truncate_jsonl(self.run_dir.metrics_path, purge_from_step)
            if purge_from_step == 0:         # starting over: the old event files are all stale
                for events in self.run_dir.tensorboard_dir.glob("events.out.tfevents.*"):
                    events.unlink()
            self._file = open(self.run_dir.metrics_path, "a", encoding="utf-8")

    def log(self, step: int, **scalars: Any) -> None:
        """Record scalars (Python/numpy numbers or one-element tensors) at global ``step``."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        values = {name: _to_float(name, v) for name, v in scalars.items()}
        for reserved in ("step", "time"):
            if reserved in values:
                raise ValueError(f"MetricsLogger.log: '{reserved}' is a reserved metric name")
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:                  # a write() error names no file: name it
            raise named_write_error(e, self._file.name) from None
        if self.tensorboard:
            writer = self._tensorboard_writer()
            for name, v in values.items():
                if math.isfinite(v):
                    writer.add_scalar(name, v, global_step=int(step))

    def _tensorboard_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir.tensorboard_dir),
                                         purge_step=self.purge_from_step)
        return self._writer

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a ``metrics.jsonl`` file (a :class:`RunDir` path or the file) into a list of dicts."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).metrics_path
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line: {e}") from None
    return out


def _to_float(name: str, value: Any) -> float:
    if hasattr(value, "numel") and hasattr(value, "item"):          # torch tensor
        if value.numel() != 1:
            raise ValueError(f"metric '{name}' must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy scalar / 1-element array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"metric '{name}' must be a number, got {type(value).__name__}")
    return float(value)


def _truncate_jsonl(path: Path, purge_from_step: int) -> None:
    """Rewrite ``path`` atomically without lines whose step is >= ``purge_from_step``.

    A torn last line (the process was killed mid-write) is dropped too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", -1) < purge_from_step:
            kept.append(line)
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))
