"""Activation checkpointing per fabric cell (``run.activation_checkpointing``).

A checkpointed cell keeps only its inputs for the backward pass; its inner activations
(every sampled op's output on every edge, the hidden nodes, the concatenation) are
recomputed during the backward pass from those inputs. Peak training memory then holds
one cell's activations at a time plus the cells' inputs and outputs. The stem's bottleneck
units (64 -> 256 channels at 1/4 of the input: at 512 px a third of a supernet step's
activations) are checkpointed one by one the same way.

What the recomputation must see to give the plain step's gradients exactly:

* the same architecture and weights: the Gumbel draw happens once per forward, before any
  cell runs (:meth:`~threempose.nas.supernet.Supernet.forward`), and the cell gets the drawn
  :class:`~threempose.nas.cell.CellChoice` (its weight tensors are checkpoint inputs, so
  their gradients reach alpha and beta); no op of a cell draws random numbers (no dropout,
  no drop-path), and both backends restore the RNG state anyway;
* the same BatchNorm statistics: in train mode BN normalises with the batch's statistics,
  which the recomputation recomputes identically; but it would also update the running
  statistics a second time. :func:`checkpoint_cell` recomputes with the cell's BN momentum
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

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from threempose.config import Config
from threempose.engine.weights import deepspeed_config
from threempose.nas.cell import Cell, CellChoice

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
    leave their running statistics as they are (momentum 0: ``1 * running + 0 * batch``, exact);
    ``num_batches_tracked`` is put back on exit. The running tensors are not written after the
    fact: the recomputed BatchNorm saved them for its backward."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)


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


def run_checkpoint_fn(cfg: Config, launched: bool) -> CheckpointFn | None:
    """The backend a run's ``run.activation_checkpointing`` asks for: None (off), DeepSpeed's
    under the launcher (its ``deepspeed`` section as the run hands it to DeepSpeed), else torch's."""
    if not cfg.run.activation_checkpointing:
        return None
    if launched:
        return deepspeed_checkpoint_fn(deepspeed_config(cfg, grad_clip=None))
    return torch_checkpoint_fn
