"""Architecture parameters and how an architecture is drawn from them (thesis §3.2-3.3).

Parameters (for ``N`` cells, ``E = H(H+1)/2`` edges per cell, ``K`` candidate ops):

* ``alpha   [N, E, K]``        which ops on each edge (micro search space, Eq. 3.6);
* ``beta    [N, 3]``           which inputs (above, parallel, below) of each cell (macro, Eq. 3.7);
* ``m_alpha [N, E, R_alpha]``  how many ops on each edge: state ``i`` keeps ``i + 1``;
* ``m_beta  [N, R_beta]``      how many inputs each cell takes: state ``i`` keeps ``i + 1``.

(The thesis gives m_beta a dimension ``|cells| x 3 x R_beta``; one count per cell is what
Table A.1 and Fig. 3.3 use, so it is ``[N, R_beta]`` here. m_alpha is per edge, not per
hidden node, since Table A.1 picks different op counts on two edges into the same node.)

Sampling modes (:meth:`ArchParameters.sample`):

``dyn_egs``  Dynamic Ensemble Gumbel-Softmax. For every row (an edge, or a cell's inputs)
    a state ``i ~ GumbelSoftmax(m)`` (hard one-hot, straight-through) picks how many, then
    the top ``i + 1`` of the Gumbel-perturbed ``alpha`` (or ``beta``) are kept::

        mask = sum_i onehot_ST(m)_i * topk_ST(logits + g, i + 1)

    ``topk_ST`` is :func:`threempose.kernels.gumbel_topk`: a hard 0/1 forward
    and the gradient of ``softmax((logits + g) / tau)``. Every ``i`` uses the same noise
    ``g`` (same seed), so the top-1 set is inside the top-2 set, and so on. The forward
    value of ``mask`` is exactly 0/1; gradients reach ``alpha``/``beta`` (through the
    selected ``topk_ST``) and ``m`` (through ``onehot_ST``, seeing how the masks of the
    other states differ). All cells' rows go into one kernel call per state ``i`` (alpha's
    ``N*E`` rows, cell-major, then beta's ``N`` rows padded with ``-inf`` to ``max(K, 3)``
    columns; seed ``2*seed + 1``), plus one call drawing every row's state (m_alpha's rows
    then m_beta's, padded to ``max(R_alpha, R_beta)``; seed ``2*seed``).
    With ``dyn_egs_sampling="ensemble"`` the ``i + 1`` choices are instead ``i + 1`` independent
    one-hot Gumbel-softmax draws, OR-ed (the other reading of §3.3's ``sum_{k=1}^{i+1} theta(alpha)^k``,
    the ensemble of DARTS-EGS)::

        mask = sum_i onehot_ST(m)_i * or_ST(onehot_ST(logits + g_0), .., onehot_ST(logits + g_i))

    ``or_ST(d_0..d_i)`` is ``min(1, d_0 + .. + d_i)`` in the forward with the gradient of the
    sum (as for copied input slots, below), so an op drawn twice is kept once and a state-``i``
    row keeps 1 to ``i + 1`` ops. Draw ``k`` of every row uses rows ``k R .. (k+1) R - 1`` of
    one kernel call over the logits stacked ``r`` times (seed ``2*seed + 1``): draw 0 is the
    ``topk`` sampler's top-1, and the draws of state ``i`` are inside those of state ``i + 1``.
    ``topk`` (the default) reads the sum as one draw's top ``i + 1``, which always keeps
    exactly ``i + 1`` distinct ops (README "Thesis choices").
``argmax``   The same without noise: ``i = argmax m``, the top ``i + 1`` of ``alpha``/``beta``
    (ties to the lower index), straight-through to ``softmax(logits / tau)``. Deterministic;
    :meth:`Supernet.derive` uses it.
``dense``    PNFS: every op and input, weighted by ``softmax(alpha)`` / ``softmax(beta)``.

Input slots and copies: ``beta`` always has three slots. A slot whose neighbour is outside
the fabric is a copy of an existing neighbour (:meth:`FabricLayout.resolve`); a cell's
weight for a real neighbour is the "or" of its slots, ``min(1, sum of slot weights)`` in
the forward with the straight-through gradient of the sum, so a neighbour chosen through
two slots is computed once, with weight 1, as the derived network does.

Reproducibility: ``seed`` (an int in ``[0, 2**62)``) fully determines a ``dyn_egs`` sample on
every rank and device (the kernel's noise is a function of (seed, row, column) only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from threempose.kernels import gumbel_topk

SamplingMode = Literal["dyn_egs", "argmax", "dense"]
SAMPLING_MODES: tuple[str, ...] = ("dyn_egs", "argmax", "dense")
DYN_EGS_SAMPLINGS: tuple[str, ...] = ("topk", "ensemble")
MAX_SEED = 2 ** 62


def gumbel_tau(epoch_progress: float, start: float = 10.0, end: float = 0.001) -> float:
    """Gumbel-softmax temperature, linear from ``start`` (progress 0) to ``end`` (progress 1).

    ``epoch_progress`` is the fraction of the search done (e.g. ``(epoch + step / steps) /
    epochs``); values outside [0, 1] are clamped.
    """
    p = min(max(float(epoch_progress), 0.0), 1.0)
    return start + (end - start) * p


@dataclass
class ArchSample:
    """One architecture drawn from the parameters.

    Attributes:
        op_weights: ``[N, E, K]`` weight of each op on each edge: exactly 1.0 / 0.0 in the
            forward value for ``dyn_egs`` and ``argmax`` (straight-through gradients), the
            softmax for ``dense``.
        path_weights: ``[N, 3]`` weight of each cell's real neighbours (above, parallel,
            below) after copies are resolved; 0 for a missing neighbour.
        ops: ``ops[n][e]``: indices of the ops with non-zero weight on edge ``e`` of cell ``n``.
        paths: ``paths[n]``: indices (0 above, 1 parallel, 2 below) of the chosen neighbours.
    """

    op_weights: Tensor
    path_weights: Tensor
    ops: list[list[list[int]]]
    paths: list[list[int]]


class ArchParameters(nn.Module):
    """alpha, beta, m_alpha, m_beta of a supernet and the sampler over them.

    Args:
        slot_sources: ``[N, 3]`` for every cell and input slot (above, parallel, below), the
            index of the real neighbour the slot reads (itself, or the one it copies).
        num_edges: ``E``; ``num_ops``: ``K``; ``r_alpha``, ``r_beta``: Dyn-EGS states.
        dyn_egs_sampling: ``"topk"`` (one draw's top ``i + 1``) or ``"ensemble"`` (``i + 1``
            one-hot draws OR-ed); module docstring. Settable after construction.

    All four parameters start at zero (uniform: the Gumbel noise alone decides at first).
    """

    def __init__(self, slot_sources: list[list[int]], num_edges: int, num_ops: int,
                 r_alpha: int, r_beta: int, dyn_egs_sampling: str = "topk") -> None:
        super().__init__()
        if dyn_egs_sampling not in DYN_EGS_SAMPLINGS:
            raise ValueError(f"dyn_egs_sampling must be one of {DYN_EGS_SAMPLINGS}, got {dyn_egs_sampling!r}")
        self.dyn_egs_sampling = dyn_egs_sampling
        n = len(slot_sources)
        self.alpha = nn.Parameter(torch.zeros(n, num_edges, num_ops))
        self.beta = nn.Parameter(torch.zeros(n, 3))
        self.m_alpha = nn.Parameter(torch.zeros(n, num_edges, r_alpha))
        self.m_beta = nn.Parameter(torch.zeros(n, r_beta))
        self.register_buffer("slot_sources", torch.tensor(slot_sources, dtype=torch.long),
                             persistent=False)

    def sample(self, mode: SamplingMode, tau: float, seed: Optional[int] = None) -> ArchSample:
        """Draw an architecture (module docstring). ``seed`` is required for ``dyn_egs``."""
        n, e, k = self.alpha.shape
        if mode == "dense":
            op_w, slot_w = self.alpha.softmax(-1), self.beta.softmax(-1)
        elif mode in ("dyn_egs", "argmax"):
            width = max(k, 3)
            logits = torch.cat([_pad(self.alpha.reshape(n * e, k), width), _pad(self.beta, width)])
            r = max(self.m_alpha.shape[-1], self.m_beta.shape[-1])
            m = torch.cat([_pad(self.m_alpha.reshape(n * e, -1), r), _pad(self.m_beta, r)])
            if mode == "dyn_egs":
                if seed is None or not 0 <= seed < MAX_SEED:
                    raise ValueError(f"dyn_egs sampling needs an int seed in [0, 2**62), got {seed!r}")
                state = gumbel_topk(m, 1, tau, 2 * seed)
                if self.dyn_egs_sampling == "ensemble":
                    masks = _ensemble_masks(logits, r, tau, 2 * seed + 1)
                else:
                    masks = [gumbel_topk(logits, i + 1, tau, 2 * seed + 1) for i in range(r)]
            else:
                state = _topk_straight_through(m, 1, tau)
                masks = [_topk_straight_through(logits, i + 1, tau) for i in range(r)]
            mixed = sum(state[:, i:i + 1] * masks[i] for i in range(r))
            op_w, slot_w = mixed[:n * e, :k].reshape(n, e, k), mixed[n * e:, :3]
        else:
            raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
        summed = torch.zeros_like(slot_w).scatter_add(1, self.slot_sources, slot_w)
        path_w = summed + (summed.clamp(max=1.0) - summed).detach()
        op_on = (op_w.detach() != 0).cpu().tolist()
        path_on = (path_w.detach() != 0).cpu().tolist()
        return ArchSample(
            op_weights=op_w, path_weights=path_w,
            ops=[[[j for j, on in enumerate(edge) if on] for edge in cell] for cell in op_on],
            paths=[[j for j, on in enumerate(cell) if on] for cell in path_on])


def _ensemble_masks(logits: Tensor, states: int, tau: float, seed: int) -> list[Tensor]:
    """``[or_ST(d_0 .. d_i) for i < states]``: ``d_k`` ``[R, W]`` is a one-hot straight-through
    Gumbel-softmax draw of every row (draw ``k`` reads rows ``k R ..`` of the stacked logits, so
    its noise differs from the other draws'); ``or_ST`` is ``min(1, sum)`` forward, the sum's
    gradient backward."""
    rows = logits.shape[0]
    draws = gumbel_topk(logits.repeat(states, 1), 1, tau, seed).reshape(states, rows, -1)
    summed = draws.cumsum(dim=0)
    return [summed[i] + (summed[i].clamp(max=1.0) - summed[i]).detach() for i in range(states)]


def _pad(x: Tensor, width: int) -> Tensor:
    """``[N, k] -> [N, width]`` with ``-inf`` columns (never selected, zero probability)."""
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), float("-inf"))], dim=1)


def _topk_straight_through(logits: Tensor, k: int, tau: float) -> Tensor:
    """Noise-free top-``k`` per row (ties to the lower index): a hard 0/1 forward with the
    gradient of ``softmax(logits / tau)``. ``[N, K] -> [N, K]``."""
    rank = torch.argsort(torch.argsort(-logits.detach(), dim=1, stable=True), dim=1)
    hard = (rank < k).to(logits.dtype)
    soft = (logits / tau).softmax(dim=1)
    return hard + (soft - soft.detach())


ARCH_SEED_STRIDE = 1_000_003


def step_seed(run_seed: int, global_step: int, phase: int) -> int:
    """The Gumbel seed of one forward: a function of (run seed, step, phase) only, so every
    rank (and a resumed run) draws the same architecture. ``phase`` 0 = weights, 1 = arch."""
    return (run_seed * ARCH_SEED_STRIDE + 2 * global_step + phase) % MAX_SEED
