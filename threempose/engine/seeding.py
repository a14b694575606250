"""Seeding and exact RNG state capture/restore (python, numpy, torch CPU, CUDA).

The captured state holds only Python ints, lists, tuples and tensors, so it
round-trips through ``torch.load(..., weights_only=True)`` inside a checkpoint.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG, torch's CPU RNG and every CUDA device."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)          # also seeds all CUDA devices


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every global RNG.

    Returns:
        ``{"python": tuple, "numpy": dict, "torch": uint8 tensor,
        "cuda": list of uint8 tensors (one per visible device; empty without CUDA)}``.
    """
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    np_state["has_gauss"] = int(np_state["has_gauss"])
    np_state["gauss"] = float(np_state["gauss"])
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs from :func:`capture_rng_state`'s output.

    The CUDA states are restored when this process sees the same number of
    devices as the one that captured them; on a machine without CUDA they are
    ignored (a GPU run resumed on a CPU cannot be bit-exact anyway).
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; it was not made by capture_rng_state()")
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                         "pos": int(np_state["state"]["pos"])}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"RNG state was captured with {len(cuda)} CUDA devices, this process "
                             f"sees {torch.cuda.device_count()}; set CUDA_VISIBLE_DEVICES to match")
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
