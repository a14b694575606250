"""The fabric network and the 3M-Pose supernet (thesis §3.1, Fig. 1.1).

``image [B,3,H,W] -> stem -> layers 1..L of cells -> exits (EELs and the last layer)``

* Stem (HRNet): 3x3 stride-2 conv-BN-ReLU (3 -> 64), 3x3 stride-2 conv-BN-ReLU (64 -> 64),
  ``stem_blocks`` bottleneck units (-> 256), 1x1 conv-BN-ReLU to ``C``: ``[B, C, ceil(H/4),
  ceil(W/4)]``. It is "layer 0, row 0": the parallel input of cell (layer 1, row 0) and the
  above input of cell (layer 1, row 1).
* Cells (:mod:`threempose.nas.cell`), layer by layer; row ``r`` is ``[B, C*2**r, ceil(H/2**(r+2)),
  ceil(W/2**(r+2))]``. Any ``H x W`` works: nothing is padded or cropped, the stride-2 convs
  round up and every resize targets the exact size of its row, so heatmaps and tags are
  always ``[B, J, ceil(H/4), ceil(W/4)]`` (map pixel ``(y, x)`` sits on input pixel
  ``(4y, 4x)``'s 4x4 cell). In train mode BatchNorm needs more than one value per channel:
  keep ``B * ceil(H / 2**(R+2)) * ceil(W / 2**(R+2)) > 1``.
* Exits (:mod:`threempose.nas.fuse_split`) at the EEL layers and the last layer.

:class:`FabricNet` builds these modules for a :class:`~threempose.nas.genotype.Genotype` and
runs any sub-architecture of it; :class:`Supernet` (every op and path) and
:class:`~threempose.nas.derived.DerivedNet` (one genotype) are both FabricNets, so a derived
network's ``state_dict`` keys are a subset of its supernet's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.config import ModelConfig
from threempose.models.hrnet_blocks import Bottleneck, make_res_layer
from threempose.nas.cell import Cell, CellChoice
from threempose.nas.checkpointing import CheckpointFn, checkpoint_cell, torch_checkpoint_fn
from threempose.nas.cost import (BlockCosts, CostTable, MacCosts, conv_macs, conv_out_size, convs_macs,
                                 expected_gflops, expected_latency)
from threempose.nas.dyn_egs import MAX_SEED, SAMPLING_MODES, ArchParameters, ArchSample, SamplingMode
from threempose.nas.fuse_split import ExitOutput, FuseSplit, Head
from threempose.nas.latency_table import LatencyTable
from threempose.nas.genotype import INPUT_NAMES, ROW_STEP, CellGene, FabricLayout, Genotype, edge_endpoints
from threempose.nas.ops import OP_NAMES, conv_bn

STEM_WIDTH = 64


class Stem(nn.Module):
    """HRNet stem: ``[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)]`` (module docstring)."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, STEM_WIDTH, 3, stride=2)
        self.conv2 = conv_bn(STEM_WIDTH, STEM_WIDTH, 3, stride=2)
        self.blocks = (make_res_layer(Bottleneck, STEM_WIDTH, STEM_WIDTH, blocks) if blocks
                       else nn.Sequential())
        width = STEM_WIDTH * Bottleneck.expansion if blocks else STEM_WIDTH
        self.proj = conv_bn(width, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.blocks(self.conv2(self.conv1(x))))

    def macs(self, h: int, w: int) -> int:
        """Multiply-adds for one ``h x w`` image."""
        h2, w2 = conv_out_size(self.conv1[0], h, w)
        h4, w4 = conv_out_size(self.conv2[0], h2, w2)
        return (conv_macs(self.conv1[0], h, w) + conv_macs(self.conv2[0], h2, w2)
                + convs_macs(self.blocks, h4, w4) + convs_macs(self.proj, h4, w4))


@dataclass
class Carry:
    """What an exit segment hands to the next one, leaving EEL ``layer``.

    feats: ``{row: [B, C * 2**r, h_r, w_r]}``, the rows of ``layer`` as its cells produced them
        (the EEL's Split is applied by the next segment, only if it runs).
    skip: ``[B, C, h_0, w_0]``, the EEL's fused features ``F`` (the Split's input and the next
        Fuse's skip); None without Fuse-Split.
    """

    layer: int
    feats: dict[int, Tensor]
    skip: Optional[Tensor]

    def tensors(self) -> list[Tensor]:
        """The carried tensors in a fixed order: the rows by row number, then ``skip`` if any."""
        return [self.feats[r] for r in sorted(self.feats)] + ([self.skip] if self.skip is not None else [])

    @classmethod
    def from_tensors(cls, layer: int, rows: Sequence[int], tensors: Sequence[Tensor]) -> "Carry":
        """The inverse of :meth:`tensors` (``rows`` sorted; one more tensor than rows: the skip)."""
        if len(tensors) not in (len(rows), len(rows) + 1):
            raise ValueError(f"a carry of rows {list(rows)} has {len(rows)} or {len(rows) + 1} tensors, "
                             f"got {len(tensors)}")
        skip = tensors[len(rows)] if len(tensors) > len(rows) else None
        return cls(layer, dict(zip(rows, tensors)), skip)

    def select(self, index: Tensor) -> "Carry":
        """The carry of batch rows ``index`` (a 1-D long tensor): drop the images that exited."""
        return Carry(self.layer, {r: f[index] for r, f in self.feats.items()},
                     None if self.skip is None else self.skip[index])


Segment = Callable[["Tensor | Carry"], tuple[ExitOutput, Optional[Carry]]]


def iter_segments(segment: Segment, images: Tensor) -> Iterator[ExitOutput]:
    """Run ``segment`` from the images, then from each carry it returns, yielding each exit's
    output; nothing after an exit is computed until the next output is asked for."""
    start: Tensor | Carry | None = images
    while start is not None:
        out, start = segment(start)
        yield out


WeightsFn = Callable[[CellGene], CellChoice]


class FabricNet(nn.Module):
    """Stem, cells and exits built for ``genotype`` (every unpruned cell, with all its ops).

    Args:
        genotype: which cells, input paths and ops exist (pruned first: cells reaching no
            exit are not built).
        num_joints: ``J``, heatmaps and tags per exit.
        stem_blocks: bottleneck units in the stem.
    """

    def __init__(self, genotype: Genotype, num_joints: int = 17, stem_blocks: int = 4) -> None:
        super().__init__()
        self.genotype = genotype.prune()
        g = self.genotype
        self.num_joints = num_joints
        self.stem_blocks = stem_blocks
        self.stem = Stem(g.channels, stem_blocks)
        self.cells = nn.ModuleDict()
        for cell in g.cells:
            if cell.pruned:
                continue
            width = g.channels * 2 ** cell.row
            in_widths = {p: g.channels * 2 ** (cell.row + ROW_STEP[p]) for p in cell.inputs}
            self.cells[str(cell.index)] = Cell(width, in_widths, cell.edges, g.hidden, cell.name, g.cell_options)
        self.exits = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for i, layer in enumerate(g.exit_layers):
            if g.fuse_split:
                rows = [c.row for c in g.cells_in_layer(layer)]
                self.exits[str(layer)] = FuseSplit(rows, g.channels, skip=i > 0, split=layer < g.layers)
            self.heads[str(layer)] = Head(g.channels, num_joints)
        self.checkpoint_fn: Optional[CheckpointFn] = None

    def use_activation_checkpointing(self, checkpoint_fn: Optional[CheckpointFn] = torch_checkpoint_fn) -> None:
        """Checkpoint every cell in forwards that record gradients (:mod:`threempose.nas.checkpointing`:
        its inner activations are recomputed in backward, gradients unchanged); None turns it off."""
        self.checkpoint_fn = checkpoint_fn

    def run(self, images: Tensor, genotype: Genotype, weights: Optional[WeightsFn] = None,
            cell_outputs: Optional[list[Tensor]] = None) -> Iterator[ExitOutput]:
        """Yield each exit's output in order, computing the fabric only as far as asked: one
        :meth:`run_segment` per exit (:func:`iter_segments`).

        Args:
            images: ``[B, 3, H, W]``.
            genotype: the (pruned) architecture to run; must be a sub-architecture of
                ``self.genotype``.
            weights: ``weights(cell) -> CellChoice`` gives a cell's ops/paths with their
                weights (supernet); None sums the genotype's ops (derived network).
            cell_outputs: if given, every computed cell's output ``[B, C_r, h_r, w_r]`` is
                appended to it (in cell order).

        Yields:
            :class:`ExitOutput`, heatmaps and tags ``[B, J, ceil(H/4), ceil(W/4)]``. After an
            EEL's output is yielded, its Split and the next layers run only if iteration
            continues.
        """
        return iter_segments(lambda start: self.run_segment(start, genotype, weights, cell_outputs), images)

    def run_segment(self, start: Tensor | Carry, genotype: Genotype, weights: Optional[WeightsFn] = None,
                    cell_outputs: Optional[list[Tensor]] = None) -> tuple[ExitOutput, Optional[Carry]]:
        """One exit segment: from the images (stem) or from an EEL's :class:`Carry` to the next exit.

        Args:
            start: images ``[B, 3, H, W]`` (the first segment), or the previous EEL's carry
                (its Split runs first, then the layers after it).
            genotype, weights, cell_outputs: as in :meth:`run`.

        Returns:
            ``(exit output, carry)``: the exit's heatmaps and tags ``[B, J, ceil(H/4),
            ceil(W/4)]`` and, at an EEL, what the next segment starts from (None at the last
            layer). The EEL's Split is left to the next segment, so stopping here costs exactly
            :meth:`exit_gflops` of this exit.
        """
        first = 1 if isinstance(start, Tensor) else start.layer + 1
        layer = next((e for e in genotype.exit_layers if e >= first), None)
        if layer is None:
            raise ValueError(f"no exit after layer {first - 1}: the last exit is layer {genotype.exit_layers[-1]}")
        if isinstance(start, Tensor):
            feats, skip = {0: self.stem(start)}, None
        else:
            feats, skip = start.feats, start.skip
            if skip is not None:
                feats = self.exits[str(start.layer)].split(skip, feats)
        h0, w0 = feats[0].shape[-2:]
        sizes = [(-(-h0 // 2 ** r), -(-w0 // 2 ** r)) for r in range(genotype.rows)]   # FabricLayout.row_size
        for current in range(first, layer + 1):
            new = {}
            for cell in genotype.cells_in_layer(current):
                inputs = {p: feats[cell.row + ROW_STEP[p]] for p in cell.inputs}
                choice = weights(cell) if weights is not None else None
                module = self.cells[str(cell.index)]
                if self.checkpoint_fn is not None and torch.is_grad_enabled():
                    new[cell.row] = checkpoint_cell(module, inputs, sizes[cell.row], choice, self.checkpoint_fn)
                else:
                    new[cell.row] = module(inputs, sizes[cell.row], choice)
                if cell_outputs is not None:
                    cell_outputs.append(new[cell.row])
            feats = new
        head = self.heads[str(layer)]
        fused = self.exits[str(layer)](feats, skip, sizes[0]) if genotype.fuse_split else None
        out = ExitOutput(layer, *head(feats[0] if fused is None else fused))
        return out, (Carry(layer, feats, fused) if layer < genotype.layers else None)

    def exit_gflops(self, input_hw: tuple[int, int] | int) -> dict[int, float]:
        """Static GFLOPs (multiply-adds / 1e9, one ``H x W`` image) of everything :meth:`run`
        computes for this network's own genotype up to and including each exit's head:
        ``{layer: gflops}``. An EEL's Split counts towards the later exits."""
        return self.exit_costs(MacCosts(), input_hw)

    def exit_costs(self, costs: BlockCosts, input_hw: tuple[int, int] | int) -> dict[int, float]:
        """:meth:`exit_gflops` priced by ``costs`` (in ``costs.unit``): ``{layer: cost}``."""
        hw = (input_hw, input_hw) if isinstance(input_hw, int) else tuple(input_hw)
        sizes = [FabricLayout.row_size(hw, r) for r in range(self.genotype.rows)]
        channels = self.genotype.channels

        def cost(module: nn.Module, row: Optional[int]) -> float:
            if isinstance(module, Cell):
                return costs.cell(module, channels * 2 ** row, sizes[row])
            return costs.block(module, hw if row is None else sizes[row])

        return {layer: raw / costs.per_unit for layer, raw in self._per_exit(cost).items()}

    def exit_params(self) -> dict[int, int]:
        """Parameters of the modules :meth:`run` uses up to each exit: ``{layer: count}``."""
        return self._per_exit(lambda m, row: sum(p.numel() for p in m.parameters()))

    def _per_exit(self, cost: Callable[[nn.Module, Optional[int]], int]) -> dict[int, int]:
        """Accumulate ``cost(module, row)`` (row None: the stem, on the image) over the modules
        in the order :meth:`run` uses them; the running total at each exit."""
        g = self.genotype
        total = cost(self.stem, None)
        out = {}
        for layer in range(1, g.layers + 1):
            total += sum(cost(self.cells[str(c.index)], c.row) for c in g.cells_in_layer(layer))
            if layer not in g.exit_layers:
                continue
            block = self.exits[str(layer)] if g.fuse_split else None
            if block is not None:
                total += cost(block.fuse, 0) + (cost(block.fuse_skip, 0) if block.fuse_skip else 0)
            total += cost(self.heads[str(layer)], 0)
            out[layer] = total
            if block is not None and block.split is not None:
                total += cost(block.split, 0)
        return out


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
            n_edges, len(self.ops), cfg.r_alpha, cfg.r_beta)
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
