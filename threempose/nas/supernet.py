"""The 3M-Pose supernet (thesis §3.2-3.3): every candidate op on every edge, every input path, with
architecture parameters sampled per forward (:mod:`threempose.nas.dyn_egs`); a
:class:`~threempose.nas.fabric.FabricNet`, so a derived network's ``state_dict`` keys are a subset
of its supernet's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.config import ModelConfig
from threempose.nas.cell import Cell, CellChoice
from threempose.nas.cost import BlockCosts, CostTable, MacCosts, expected_gflops, expected_latency
from threempose.nas.dyn_egs import MAX_SEED, SAMPLING_MODES, ArchParameters, ArchSample, SamplingMode
from threempose.nas.fabric import FabricNet, WeightsFn
from threempose.nas.fuse_split import ExitOutput
from threempose.nas.genotype import INPUT_NAMES, CellGene, FabricLayout, Genotype, edge_endpoints
from threempose.nas.latency_table import LatencyTable
from threempose.nas.ops import OP_NAMES


def sample_weights(sample: ArchSample, ops: Sequence[str]) -> WeightsFn:
    """``cell -> CellChoice`` giving a sampled cell's inputs and ops their sample weights."""
    op_index = {op: k for k, op in enumerate(ops)}

    def weights(cell: CellGene) -> CellChoice:
        n = cell.index
        return CellChoice(
            paths=cell.inputs,
            path_weights=sample.path_weights[n, [INPUT_NAMES.index(p) for p in cell.inputs]],
            edges=cell.edges,
            edge_weights=[sample.op_weights[n, e, [op_index[o] for o in edge]]
                          for e, edge in enumerate(cell.edges)])
    return weights


@dataclass
class SupernetOutput:
    """What one supernet forward returns.

    Attributes:
        exits: one :class:`ExitOutput` per EEL and the last layer, in order.
        gflops: 0-d tensor, expected multiply-add GFLOPs (one image, this input size) of the
            architecture sampled in this forward, differentiable w.r.t. alpha, beta, m_alpha,
            m_beta (:func:`threempose.nas.cost.expected_gflops`). In ``dyn_egs`` and ``argmax``
            mode its value is the derived network's cost; in ``dense`` mode it is the
            softmax-weighted cost (what a FLOPs loss should see), not the dense supernet's.
        cell_outputs: every computed cell's output ``[B, C_r, h_r, w_r]``, in cell order.
        genotype: the sampled architecture (pruned), as a derived network would build it.
        latency: with a latency table attached (:meth:`Supernet.use_latency_table`), the
            expected latency in ms of the same architecture on the table's device at the
            table's input size (whatever the images' size), differentiable as ``gflops``; else None.
    """

    exits: list[ExitOutput]
    gflops: Tensor
    cell_outputs: list[Tensor]
    genotype: Genotype
    latency: Optional[Tensor] = None


class Supernet(FabricNet):
    """The 3M-Pose search space: every candidate op on every edge, every input path.

    ``Supernet(cfg)`` for a :class:`~threempose.config.ModelConfig`. Each forward draws an
    architecture from alpha, beta, m_alpha, m_beta (``self.sampling``: ``"dyn_egs"``,
    ``"argmax"`` or ``"dense"``, initially ``cfg.sampling``) and computes only that
    architecture's ops and paths (all of them in ``dense`` mode), and only the cells whose
    output reaches an exit.

    Usage::

        net = Supernet(cfg.model)
        out = net(images, tau=gumbel_tau(progress), seed=step)   # same seed -> same architecture
        loss = sum(...) + flops_loss(out.gflops)
        net.arch_parameters(), net.weight_parameters()           # for the two optimizers
        net.derive().save("genotype.json")
    """

    def __init__(self, cfg: ModelConfig) -> None:
        unknown = [op for op in cfg.ops if op not in OP_NAMES]
        if unknown or not cfg.ops or len(set(cfg.ops)) != len(cfg.ops):
            raise ValueError(f"model.ops must be distinct names from {list(OP_NAMES)}, got {cfg.ops}")
        if not 1 <= cfg.r_alpha <= len(cfg.ops):
            raise ValueError(f"model.r_alpha must be in 1..{len(cfg.ops)} (the number of ops), got {cfg.r_alpha}")
        if not 1 <= cfg.r_beta <= 3:
            raise ValueError(f"model.r_beta must be in 1..3 (above, parallel, below), got {cfg.r_beta}")
        layout = FabricLayout(cfg.rows, cfg.layers)
        n_edges = len(edge_endpoints(cfg.hidden))
        full = Genotype(
            rows=cfg.rows, layers=cfg.layers, hidden=cfg.hidden, channels=cfg.channels,
            eels=list(cfg.eels), fuse_split=cfg.fuse_split, cell_options=cfg.cell_options,
            cells=[CellGene(c.index, c.layer, c.row,
                            [p for p in INPUT_NAMES if layout.source(c, p) is not None],
                            [list(cfg.ops) for _ in range(n_edges)]) for c in layout.cells])
        super().__init__(full, cfg.num_joints, cfg.stem_blocks)
        self.ops = list(cfg.ops)
        self.sampling: SamplingMode = cfg.sampling
        self.arch = ArchParameters(
            [[INPUT_NAMES.index(layout.resolve(c, p)) for p in INPUT_NAMES] for c in layout.cells],
            n_edges, len(self.ops), cfg.r_alpha, cfg.r_beta, cfg.dyn_egs_sampling)
        self._costs: dict[tuple, tuple[BlockCosts, CostTable]] = {}
        self._mac_costs = MacCosts()
        self.latency_table: Optional[LatencyTable] = None
        self._seeds = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------- parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        """alpha, beta, m_alpha, m_beta."""
        return [self.arch.alpha, self.arch.beta, self.arch.m_alpha, self.arch.m_beta]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (stem, cells, exits, heads)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # ---------------------------------------------------------------- sampling
    def sample(self, tau: float, seed: Optional[int] = None,
               mode: Optional[SamplingMode] = None) -> ArchSample:
        """Draw an architecture (``mode`` defaults to ``self.sampling``). With ``seed=None``
        a ``dyn_egs`` draw takes its seed from the supernet's own generator (seeded 0 at
        construction, advanced by each such draw), never from the global RNG."""
        mode = mode or self.sampling
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
        if mode == "dyn_egs" and seed is None:
            seed = int(torch.randint(MAX_SEED, (1,), generator=self._seeds))
        return self.arch.sample(mode, tau, seed)

    def genotype_of(self, sample: ArchSample) -> Genotype:
        """The architecture of ``sample`` as a pruned genotype (copies resolved to neighbours)."""
        g = self.genotype
        cells = [CellGene(c.index, c.layer, c.row,
                          [INPUT_NAMES[p] for p in sample.paths[c.index]],
                          [[self.ops[k] for k in edge] for edge in sample.ops[c.index]])
                 for c in g.cells]
        return Genotype(rows=g.rows, layers=g.layers, hidden=g.hidden, channels=g.channels,
                        eels=list(g.eels), cells=cells, fuse_split=g.fuse_split,
                        cell_options=g.cell_options).prune()

    def derive(self) -> Genotype:
        """The searched architecture: argmax on m, top-(i+1) of alpha and beta, pruned."""
        with torch.no_grad():
            return self.genotype_of(self.sample(tau=1.0, mode="argmax"))

    # ----------------------------------------------------------------- forward
    def forward(self, images: Tensor, tau: float, seed: Optional[int] = None) -> SupernetOutput:
        """Sample an architecture and run it.

        Args:
            images: ``[B, 3, H, W]``, any ``H, W``.
            tau: Gumbel-softmax temperature (:func:`threempose.nas.dyn_egs.gumbel_tau`).
            seed: int in ``[0, 2**62)``; the same seed draws the same architecture (on every
                rank). Ignored in ``argmax`` and ``dense`` modes.

        Returns:
            :class:`SupernetOutput` (exits ``[B, J, ceil(H/4), ceil(W/4)]``, gflops, cell outputs).
        """
        sample = self.sample(tau, seed)
        genotype = self.genotype_of(sample)
        live = torch.zeros(len(genotype.cells), device=images.device)
        live[[c.index for c in genotype.cells if not c.pruned]] = 1.0
        gflops = expected_gflops(self.cost_table(self._mac_costs, tuple(images.shape[-2:])),
                                 sample.op_weights, sample.path_weights, live)
        latency = None
        if self.latency_table is not None:
            latency = expected_latency(self.cost_table(self.latency_table, self.latency_table.input_hw),
                                       sample.op_weights, sample.path_weights, live)
        cell_outputs: list[Tensor] = []
        exits = list(self.run(images, genotype, sample_weights(sample, self.ops), cell_outputs))
        return SupernetOutput(exits, gflops, cell_outputs, genotype, latency)

    def use_latency_table(self, table: Optional[LatencyTable]) -> None:
        """Price every forward's architecture in ms too (``SupernetOutput.latency``) with
        ``table``, checked against this supernet (:meth:`LatencyTable.check_fabric`); None stops."""
        if table is not None:
            table.check_fabric(self.genotype, self.stem_blocks, self.num_joints, self.ops)
        self.latency_table = table

    def cost_table(self, costs: BlockCosts, input_hw: tuple[int, int]) -> CostTable:
        """Per-cell candidate costs at ``input_hw`` priced by ``costs`` (cached per pricing,
        size and device; the cache holds ``costs``, so its id is never reused). Cells that can
        never reach an exit (not built) cost 0."""
        device = self.arch.alpha.device
        key = (id(costs), costs.unit, *input_hw, str(device))
        if key not in self._costs:
            g = self.genotype
            ops, paths, outputs = [], [], []
            for c in g.cells:
                if c.pruned:
                    ops.append([0] * len(self.ops))
                    paths.append([0] * len(INPUT_NAMES))
                    outputs.append(0)
                    continue
                cell = self.cells[str(c.index)]
                hw, width = FabricLayout.row_size(input_hw, c.row), g.channels * 2 ** c.row
                add = costs.add(width, hw)  # one sum per path and op, -(1 + H) per cell (cost.py)
                ops.append([costs.op(cell.edges[0][op], op, width, hw) + add for op in self.ops])
                paths.append([costs.path(cell.inputs[p], p, width, hw) + add if p in cell.inputs else 0
                              for p in INPUT_NAMES])
                outputs.append(costs.output(cell.output, g.hidden, width, hw) - (1 + g.hidden) * add)
            sizes = [FabricLayout.row_size(input_hw, r) for r in range(g.rows)]

            def fixed_cost(module: nn.Module, row: Optional[int]) -> float:  # stem, Fuse-Split, heads
                if isinstance(module, Cell):
                    return 0
                return costs.block(module, input_hw if row is None else sizes[row])

            fixed = self._per_exit(fixed_cost)[g.layers]

            def in_unit(x: list) -> Tensor:
                raw = torch.tensor(x, dtype=torch.float64)
                return (raw / costs.per_unit).to(device=device, dtype=torch.float32)

            table = CostTable(ops=in_unit(ops), paths=in_unit(paths), outputs=in_unit(outputs),
                              fixed=fixed / costs.per_unit, unit=costs.unit)
            self._costs[key] = costs, table
        return self._costs[key][1]
