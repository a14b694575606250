"""Atomic, tagged checkpoints.

A checkpoint is a dict saved with ``torch.save`` through a temporary file and a
rename (:func:`threempose.util.files.atomic_torch_save`), so an interrupted save
leaves the previous file intact. It carries a format tag checked on load.

What a resumable run puts in ``state`` (the caller's choice of keys; these are
the conventional ones)::

    model        model.state_dict() (weights; arch params included if registered)
    arch         architecture parameters (alpha, beta, m) when kept separately
    optimizers   {"weights": opt.state_dict(), "arch": ...}
    schedulers   {"weights": sched.state_dict(), ...}
    rng          threempose.engine.seeding.capture_rng_state()
    epoch        epoch in progress (from 0)
    step_in_epoch  steps of that epoch already done
    global_step  steps done in the whole run
    data_order   whatever restores the sampler's position (e.g. its seed/permutation)
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from threempose.util.errors import UserError
from threempose.util.files import atomic_torch_save

FORMAT = "threempose-checkpoint"
VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or not a threempose checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, read-only, I/O error)."""


class StateDictMismatchError(CheckpointError):
    """A checkpoint's state_dict does not fit the model.

    ``missing`` and ``unexpected`` list keys; ``shape_mismatches`` holds
    ``(key, checkpoint_shape, model_shape)`` tuples. The message lists the first of each.
    """

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 shape_mismatches: Sequence[tuple[str, tuple, tuple]] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatches = list(shape_mismatches)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save ``state`` (a dict with string keys) to ``path`` atomically; return the path."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise TypeError("save_checkpoint: state must be a dict with string keys")
    if "format" in state or "version" in state:
        raise ValueError("save_checkpoint: 'format' and 'version' are reserved checkpoint keys")
    path = Path(path)
    atomic_torch_save(path, {"format": FORMAT, "version": VERSION, **state})
    return path


_REFUSED = "Unsupported global"   # weights_only's refusal of a class or function (could run code)


def read_torch_file(path: str | os.PathLike, map_location: Any = "cpu", what: str = "a checkpoint",
                    advice: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError` s: a file
    holding Python objects other than tensors and plain containers is refused as "not ``what``"
    (loading it could run code; ``advice`` is appended), and a damaged or foreign file is named
    as unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _REFUSED not in str(e):              # else a damaged or foreign pickle stream
            raise CheckpointError(f"cannot read {path}: it is corrupt, truncated or not a torch "
                                  f"checkpoint at all (UnpicklingError); expected {what}") from e
        raise CheckpointError(f"{path} is not {what}: it holds Python objects other than tensors and "
                              "plain containers, which threempose does not load (they could run code)"
                              + (f"; {advice}" if advice else "")) from e
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read {path}: it is corrupt, truncated or not a torch checkpoint "
                              f"at all ({type(e).__name__}); expected {what}") from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.pt`` file.
        map_location: passed to ``torch.load`` (default: tensors on the CPU).
        required: keys the caller needs; a missing one is a :class:`CheckpointError`.

    Returns:
        The saved ``state`` dict (without the format tag).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = read_torch_file(path, map_location, "a threempose checkpoint")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a threempose checkpoint (no '{FORMAT}' format tag); "
                              f"pass a file written by a threempose search or train run")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path} is a threempose checkpoint of format version "
                              f"{raw.get('version')}, this threempose reads version {VERSION}")
    state = {k: v for k, v in raw.items() if k not in ("format", "version")}
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing} (it has {sorted(state)})")
    return state

_SHOW = 3  # keys named per kind of mismatch in the one-line error


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`StateDictMismatchError` (naming ``source``) when ``sd`` does not fit ``model``:
    one line with the counts of missing keys, unexpected keys and shape mismatches and the first
    few of each (the exception's attributes hold them all)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k].shape))
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def first(items: list[str]) -> str:
        more = f", ... (+{len(items) - _SHOW})" if len(items) > _SHOW else ""
        return ", ".join(items[:_SHOW]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({first(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, checkpoint vs model "
                     f"({first([f'{k}: {list(a)} vs {list(b)}' for k, a, b in shapes])})")
    raise StateDictMismatchError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts),
                                 missing, unexpected, shapes)
