"""Activation checkpointing (``run.activation_checkpointing``).

A checkpointed part keeps only its inputs for the backward pass; its inner activations are
recomputed during the backward pass from those inputs. :class:`~threempose.nas.fabric.FabricNet`
checkpoints the cells of every row but the last (:func:`checkpointed_rows`; a cell's inner
activations are every sampled op's output on every edge, the hidden nodes, the
concatenation), the exits' Fuse blocks (:func:`checkpoint_fuse`: row 0's resolution, cheap
ops) and the stem's first bottleneck unit (64 -> 256 channels at 1/4 of the input, with the
projection shortcut). That choice is a trade: recomputing costs about its share of the
forward pass, and on the CPU a supernet step's forward is ~45 % of it. The last row's cells
hold the fewest bytes per multiply-add; checkpointing them and the other three stem units
too frees more memory (thesis supernet at 512 px: 0.34 of the plain step's live peak
instead of 0.45) for recomputing ~30 % more of the forward (README, "Scale").

What the recomputation must see to give the plain step's gradients exactly:

* the same architecture and weights: the Gumbel draw happens once per forward, before any
  cell runs (:meth:`~threempose.nas.supernet.Supernet.forward`), and the cell gets the drawn
  :class:`~threempose.nas.cell.CellChoice` (its weight tensors are checkpoint inputs, so
  their gradients reach alpha and beta); no op of a cell draws random numbers (no dropout,
  no drop-path), and both backends restore the RNG state anyway;
* the same BatchNorm statistics: in train mode BN normalises with the batch's statistics,
  which the recomputation recomputes identically; but it would also update the running
  statistics a second time. :func:`checkpointed` recomputes with the part's BN momentum
  at 0, so they move once per step as without checkpointing.

Backends: ``torch.utils.checkpoint`` (non-reentrant) in one process;
``deepspeed.checkpointing.checkpoint`` under the DeepSpeed launcher, configured from the
config's ``deepspeed.activation_checkpointing`` section (partition_activations,
cpu_checkpointing, ...) by :func:`deepspeed_checkpoint_fn`; :func:`run_checkpoint_fn` picks one
for a run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from threempose.config import Config
from threempose.engine.weights import deepspeed_config
from threempose.nas.cell import Cell, CellChoice
from threempose.nas.fuse_split import FuseSplit

CheckpointFn = Callable[..., Tensor]
"""``fn(function, *tensors) -> function(*tensors)``, keeping only ``tensors`` for backward."""


def torch_checkpoint_fn(function: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``torch.utils.checkpoint`` without re-entrance (RNG state preserved)."""
    return torch_checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)


def deepspeed_checkpoint_fn(ds_config: Mapping[str, Any]) -> CheckpointFn:
    """DeepSpeed's activation checkpointing, configured from a DeepSpeed config dict
    (its ``activation_checkpointing`` section; defaults where it has none)."""
    import deepspeed

    deepspeed.checkpointing.configure(None, deepspeed_config=dict(ds_config))
    return deepspeed.checkpointing.checkpoint


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside: ``module``'s BatchNorms normalise with the batch statistics as in train mode but
    leave their running statistics as they are (momentum 0: ``1 * running + 0 * batch``, exact)
    and do not count the batch (``num_batches_tracked`` set aside: with momentum 0 the count
    is not read). Entering and leaving run no tensor op (the running tensors are not written
    after the fact: the recomputed BatchNorm saved them for its backward)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked) for m in norms]
    for m in norms:
        m.momentum = 0.0
        m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked = tracked


def checkpointed(module: nn.Module, function: Callable[..., Tensor], tensors: Sequence[Tensor],
                 checkpoint_fn: CheckpointFn = torch_checkpoint_fn) -> Tensor:
    """``function(*tensors)`` (which runs ``module``) with its inner activations recomputed in
    backward; the recomputation leaves ``module``'s BatchNorm statistics alone."""
    calls = 0

    def run(*args: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        with _bn_stats_frozen(module) if calls > 1 else contextlib.nullcontext():
            return function(*args)

    return checkpoint_fn(run, *tensors)


def checkpoint_cell(cell: Cell, inputs: Mapping[str, Tensor], size: tuple[int, int],
                    choice: CellChoice | None, checkpoint_fn: CheckpointFn = torch_checkpoint_fn) -> Tensor:
    """``cell(inputs, size, choice)`` with its inner activations recomputed in backward.

    Args:
        cell: the cell to run.
        inputs: ``{path name: [B, C_p, h_p, w_p]}`` as :meth:`Cell.forward` takes them.
        size: ``(h, w)``, the cell's row size.
        choice: the sampled sub-cell (supernet) or None (derived network).
        checkpoint_fn: the backend (:func:`torch_checkpoint_fn`, :func:`deepspeed_checkpoint_fn`).
    Returns:
        ``[B, C, h, w]``, equal to the plain call's output; so are all gradients.
    """
    names = list(inputs)
    n_in = len(names)
    weights: list[Tensor] = [] if choice is None else [choice.path_weights, *choice.edge_weights]

    def run(*tensors: Tensor) -> Tensor:
        rebuilt = None
        if choice is not None:      # the weights as checkpoint inputs: their gradients reach alpha, beta
            rebuilt = CellChoice(choice.paths, tensors[n_in], choice.edges, list(tensors[n_in + 1:]))
        return cell(dict(zip(names, tensors[:n_in])), size, rebuilt)

    return checkpointed(cell, run, [inputs[n] for n in names] + weights, checkpoint_fn)


def checkpoint_fuse(block: FuseSplit, feats: Mapping[int, Tensor], skip: Tensor | None, size: tuple[int, int],
                    checkpoint_fn: CheckpointFn = torch_checkpoint_fn) -> Tensor:
    """``block(feats, skip, size)`` (an exit's Fuse) with its inner activations recomputed in backward.

    Args:
        block: the exit layer's :class:`~threempose.nas.fuse_split.FuseSplit`.
        feats: ``{row: [B, C*2**row, h_row, w_row]}``, the layer's rows.
        skip: the previous EEL's fused features ``[B, C, *size]`` or None.
        size: ``(h_0, w_0)``, row 0's size.
        checkpoint_fn: the backend.
    Returns:
        ``[B, C, *size]``, equal to the plain call's output; so are all gradients.
    """
    rows = list(feats)
    tensors = [feats[r] for r in rows] + ([] if skip is None else [skip])

    def run(*args: Tensor) -> Tensor:
        return block(dict(zip(rows, args[:len(rows)])), None if skip is None else args[len(rows)], size)

    return checkpointed(block, run, tensors, checkpoint_fn)


def checkpointed_rows(rows: int) -> range:
    """The rows whose cells a fabric of ``rows`` rows checkpoints: all but the lowest-resolution one
    (a fabric of one row: that row). Row ``r``'s activations are ``C*2**r x (H/2**(r+2))**2``,
    half of row ``r-1``'s per cell, for about the same multiply-adds, so the last row frees the
    fewest bytes per second of recomputation (at 512 px: 4 % of the plain step's saved bytes
    for 5-11 % of its forward)."""
    return range(max(rows - 1, 1))


def run_checkpoint_fn(cfg: Config, launched: bool) -> CheckpointFn | None:
    """The backend a run's ``run.activation_checkpointing`` asks for: None (off), DeepSpeed's
    under the launcher (its ``deepspeed`` section as the run hands it to DeepSpeed), else torch's."""
    if not cfg.run.activation_checkpointing:
        return None
    if launched:
        return deepspeed_checkpoint_fn(deepspeed_config(cfg, grad_clip=None))
    return torch_checkpoint_fn
