"""The fabric network (thesis §3.1, Fig. 1.1).

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
runs any sub-architecture of it; :class:`~threempose.nas.supernet.Supernet` (every op and path) and
:class:`~threempose.nas.derived.DerivedNet` (one genotype) are both FabricNets, so a derived
network's ``state_dict`` keys are a subset of its supernet's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.nas.cell import Cell, CellChoice
from threempose.nas.checkpointing import (CheckpointFn, checkpoint_cell, checkpoint_fuse, checkpointed,
                                         checkpointed_rows, torch_checkpoint_fn)
from threempose.nas.cost import BlockCosts, MacCosts
from threempose.nas.fuse_split import ExitOutput, FuseSplit, Head
from threempose.nas.genotype import ROW_STEP, CellGene, FabricLayout, Genotype
from threempose.nas.stem import Stem


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
        """In forwards that record gradients, checkpoint the cells of every row but the last
        (:func:`~threempose.nas.checkpointing.checkpointed_rows`), the exits' Fuse blocks and the
        stem's first bottleneck unit (:mod:`threempose.nas.checkpointing`: their inner activations
        are recomputed in backward, gradients unchanged); None turns it off."""
        self.checkpoint_fn = checkpoint_fn

    def _active_checkpoint_fn(self) -> Optional[CheckpointFn]:
        """The checkpoint backend if this forward checkpoints (one that records gradients), else None."""
        return self.checkpoint_fn if torch.is_grad_enabled() else None

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
        fn = self._active_checkpoint_fn()
        if isinstance(start, Tensor):
            run_first_unit = None if fn is None else (lambda unit, x: checkpointed(unit, unit, [x], fn))
            feats, skip = {0: self.stem(start, run_first_unit)}, None
        else:
            feats, skip = start.feats, start.skip
            if skip is not None:
                feats = self.exits[str(start.layer)].split(skip, feats)
        h0, w0 = feats[0].shape[-2:]
        sizes = [(-(-h0 // 2 ** r), -(-w0 // 2 ** r)) for r in range(genotype.rows)]   # FabricLayout.row_size
        ckpt_rows = checkpointed_rows(genotype.rows)
        for current in range(first, layer + 1):
            new = {}
            for cell in genotype.cells_in_layer(current):
                inputs = {p: feats[cell.row + ROW_STEP[p]] for p in cell.inputs}
                choice = weights(cell) if weights is not None else None
                module = self.cells[str(cell.index)]
                if fn is not None and cell.row in ckpt_rows:
                    new[cell.row] = checkpoint_cell(module, inputs, sizes[cell.row], choice, fn)
                else:
                    new[cell.row] = module(inputs, sizes[cell.row], choice)
                if cell_outputs is not None:
                    cell_outputs.append(new[cell.row])
            feats = new
        head = self.heads[str(layer)]
        fused = None
        if genotype.fuse_split:
            block = self.exits[str(layer)]
            fused = (block(feats, skip, sizes[0]) if fn is None
                     else checkpoint_fuse(block, feats, skip, sizes[0], fn))
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


