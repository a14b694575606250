"""Cell-based neural fabrics (CNFs) for PNFS: backbone and part subnetworks (PNFS §III-B, C, F).

PNFS builds both its fabric backbone and its part subnetworks from one fabric of cells
(Fig. 5): the *backbone* keeps the first ``m`` layers of a fabric that grows from a stem
(:class:`~threempose.nas.genotype.FabricLayout`: layer 1 has rows 0-1, layer 2 rows 0-2, ...),
and a *subnetwork* keeps the last ``n`` layers, so every one of its layers has all rows and
its layer 0 is the backbone's feature pyramid (:class:`PyramidLayout`). Only cells that reach
the fabric's output are built: for a subnetwork, the row-0 cell of its last layer (its part
representation; Fig. 3 "the final cell in the highest scale"), which leaves 3 + 2 + 1 = 6
cells of a 3-layer subnetwork (PNFS §IV-A "the total number of cells is 6"); for a backbone,
every row of its last layer (the pyramid).

The cells, ops, input paths, architecture parameters and samplers are the 3M-Pose search
space's own (:mod:`threempose.nas`): a :class:`CellFabric` runs :class:`~threempose.nas.cell.Cell`
modules layer by layer; :class:`SearchableFabric` adds alpha / beta / m_alpha / m_beta
(:class:`FabricArch`, an :class:`~threempose.nas.dyn_egs.ArchParameters`) and draws an
architecture per forward with any of ``dense`` (PNFS Eq. 1-2: every op and input, softmax
weighted), ``dyn_egs`` or ``argmax``; :class:`FixedFabric` runs one architecture with fixed
weights (a pruned dense search, or a derived genotype whose ops are summed).

Architecture parameters (PNFS §III-F): beta is per cell; alpha is shared by all cells of
one fabric (``share_alpha=True``, "alpha_{s,l} share same weights across a CNF") or per cell.
Every fabric (each part's, the backbone's) has its own.

Pruning (§III-F "Pruning Useless Structures"): :meth:`SearchableFabric.prune` drops every op
and every input path whose normalised weight is below a threshold, then every cell whose
output no longer reaches the output, and keeps the remaining weights as they are, so the
pruned network computes the dense one's output minus the dropped terms (~0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.config import CellOptions
from threempose.nas.cell import Cell, CellChoice
from threempose.nas.dyn_egs import MAX_SEED, SAMPLING_MODES, ArchParameters, ArchSample, SamplingMode
from threempose.nas.genotype import (
    INPUT_NAMES,
    ROW_STEP,
    CellGene,
    FabricLayout,
    Genotype,
    GenotypeError,
    edge_endpoints,
)
from threempose.nas.ops import OP_NAMES
from threempose.nas.supernet import sample_weights


# --------------------------------------------------------------------------- #
# Layouts and genotypes
# --------------------------------------------------------------------------- #
class PyramidLayout(FabricLayout):
    """The last layers of a fabric: every layer, layer 0 (the input pyramid) included, has
    all ``rows`` rows. A ``rows x layers`` pyramid layout has ``rows * layers`` cells, numbered
    column by column, top row first; the only missing neighbours are row 0's ``above`` and the
    last row's ``below``, whose input slots copy ``parallel`` (PNFS footnote 2)."""

    def rows_in_layer(self, layer: int) -> int:
        return self.rows


class PyramidGenotype(Genotype):
    """A :class:`~threempose.nas.genotype.Genotype` over a :class:`PyramidLayout` (a part
    subnetwork): layer-0 inputs are the rows of the backbone pyramid. Same fields, JSON format
    and validation; a subnetwork has one output, its last layer's row 0 (``eels = []``,
    ``fuse_split = False``).

    (``Genotype`` builds its layout in validation by assigning ``self.layout``; this subclass
    turns that assignment into the pyramid layout of the same size.)
    """

    @property
    def layout(self) -> FabricLayout:
        return self._pyramid_layout

    @layout.setter
    def layout(self, value: FabricLayout) -> None:
        self._pyramid_layout = PyramidLayout(value.rows, value.layers)


def full_genotype(kind: str, rows: int, layers: int, hidden: int, channels: int,
                  ops: Sequence[str], options: CellOptions = CellOptions()) -> Genotype:
    """Every cell with every existing input and every op in ``ops`` on every edge, pruned to the
    cells that reach the output.

    Args:
        kind: ``"backbone"`` (a :class:`FabricLayout` from a stem; its output is every row of the
            last layer) or ``"part"`` (a :class:`PyramidGenotype`; its output is the last layer's
            row 0).
        rows, layers, hidden, channels: the fabric (row ``r`` is ``channels * 2**r`` wide).
        ops: candidate op names (:data:`threempose.nas.ops.OP_NAMES`).
        options: the cells' :class:`~threempose.config.CellOptions`.
    """
    if kind not in ("backbone", "part"):
        raise ValueError(f"fabric kind must be 'backbone' or 'part', got {kind!r}")
    unknown = [op for op in ops if op not in OP_NAMES]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise ValueError(f"fabric ops must be distinct names from {list(OP_NAMES)}, got {list(ops)}")
    if kind == "backbone" and layers < rows - 1:
        raise ValueError(f"a {rows}-row fabric backbone needs at least {rows - 1} layers for its last "
                         f"layer to hold every row of the pyramid, got {layers}")
    cls, layout = ((Genotype, FabricLayout(rows, layers)) if kind == "backbone"
                   else (PyramidGenotype, PyramidLayout(rows, layers)))
    n_edges = len(edge_endpoints(hidden))
    cells = [CellGene(c.index, c.layer, c.row, [p for p in INPUT_NAMES if layout.source(c, p) is not None],
                      [list(ops) for _ in range(n_edges)]) for c in layout.cells]
    return cls(rows=rows, layers=layers, hidden=hidden, channels=channels, eels=[], cells=cells,
               fuse_split=kind == "backbone", cell_options=options).prune()


def output_rows(genotype: Genotype) -> list[int]:
    """The rows of the last layer that are the fabric's output (all for a backbone, [0] for a part)."""
    return [c.row for c in genotype.cells_in_layer(genotype.layers) if genotype.feeds_exit(c)]


def input_rows(genotype: Genotype) -> list[int]:
    """The layer-0 rows that the fabric's layer-1 cells read (a part fabric's pyramid rows)."""
    return sorted({c.row + ROW_STEP[p] for c in genotype.cells_in_layer(1) for p in c.inputs})


# --------------------------------------------------------------------------- #
# Running cells
# --------------------------------------------------------------------------- #
WeightsFn = Callable[[CellGene], Optional[CellChoice]]


class CellFabric(nn.Module):
    """The cells of a (pruned) genotype, run layer by layer over given layer-0 features.

    Args:
        genotype: which cells, inputs and ops exist (a :class:`Genotype` or :class:`PyramidGenotype`;
            pruned on construction). Row ``r`` is ``genotype.channels * 2**r`` wide.

    ``forward(feats, weights, genotype)``: ``feats[r]`` is layer 0's row ``r``,
    ``[B, C * 2**r, ceil(h0 / 2**r), ceil(w0 / 2**r)]`` (``h0 x w0`` is row 0's size; a
    backbone passes only row 0, the stem). Returns the last layer's output rows
    (:func:`output_rows`), same shapes.
    """

    def __init__(self, genotype: Genotype) -> None:
        super().__init__()
        self.genotype = genotype.prune()
        g = self.genotype
        self.cells = nn.ModuleDict()
        for cell in g.cells:
            if not cell.pruned:
                in_widths = {p: g.channels * 2 ** (cell.row + ROW_STEP[p]) for p in cell.inputs}
                self.cells[str(cell.index)] = Cell(g.channels * 2 ** cell.row, in_widths, cell.edges,
                                                   g.hidden, cell.name, g.cell_options)

    def forward(self, feats: Mapping[int, Tensor], weights: Optional[WeightsFn] = None,
                genotype: Optional[Genotype] = None) -> dict[int, Tensor]:
        """Run ``genotype`` (default: the fabric's own; it must be a sub-architecture of it),
        with ``weights(cell) -> CellChoice`` (None: sum the ops and inputs)."""
        g = genotype if genotype is not None else self.genotype
        h0, w0 = feats[0].shape[-2:]
        sizes = [(math.ceil(h0 / 2 ** r), math.ceil(w0 / 2 ** r)) for r in range(g.rows)]
        current = dict(feats)
        for layer in range(1, g.layers + 1):
            new = {}
            for cell in g.cells_in_layer(layer):
                inputs = {p: current[cell.row + ROW_STEP[p]] for p in cell.inputs}
                choice = weights(cell) if weights is not None else None
                new[cell.row] = self.cells[str(cell.index)](inputs, sizes[cell.row], choice)
            current = new
        return {r: current[r] for r in output_rows(g)}


# --------------------------------------------------------------------------- #
# Architecture parameters
# --------------------------------------------------------------------------- #
class FabricArch(ArchParameters):
    """alpha, beta, m_alpha, m_beta of one fabric (:class:`~threempose.nas.dyn_egs.ArchParameters`
    and its samplers), with alpha optionally shared by all cells.

    Args:
        layout: the fabric's layout (its cells and their input copies).
        num_edges, num_ops, r_alpha, r_beta, dyn_egs_sampling: as :class:`ArchParameters`.
        share_alpha: one ``[1, E, K]`` parameter (``shared_alpha``) serves every cell (PNFS
            §III-F); ``alpha`` is then its ``[N, E, K]`` expansion. Else ``alpha`` is ``[N, E, K]``.
    """

    def __init__(self, layout: FabricLayout, num_edges: int, num_ops: int, r_alpha: int,
                 r_beta: int, share_alpha: bool, dyn_egs_sampling: str = "topk") -> None:
        slots = [[INPUT_NAMES.index(layout.resolve(c, p)) for p in INPUT_NAMES] for c in layout.cells]
        super().__init__(slots, num_edges, num_ops, r_alpha, r_beta, dyn_egs_sampling)
        self.share_alpha = share_alpha
        self.num_cells = len(slots)
        if share_alpha:
            del self.alpha                                   # the [N, E, K] parameter
            self.shared_alpha = nn.Parameter(torch.zeros(1, num_edges, num_ops))

    @property
    def alpha(self) -> Tensor:
        """``[N, E, K]`` op logits of every cell (a view of ``shared_alpha`` when shared)."""
        if self.share_alpha:
            return self.shared_alpha.expand(self.num_cells, -1, -1)
        return self._parameters["alpha"]

    def parameters_list(self) -> list[nn.Parameter]:
        """The trainable tensors: (shared_)alpha, beta, m_alpha, m_beta."""
        alpha = self.shared_alpha if self.share_alpha else self._parameters["alpha"]
        return [alpha, self.beta, self.m_alpha, self.m_beta]


@dataclass
class CellWeights:
    """Fixed weights of one cell of an architecture: ``paths[i]`` weighs ``cell.inputs[i]``,
    ``edges[e][k]`` weighs op ``cell.edges[e][k]``."""

    paths: list[float]
    edges: list[list[float]]


@dataclass
class FabricArchitecture:
    """One fabric's searched architecture: a pruned genotype and, for a dense search, the
    weight of every kept input and op (``weights[cell index]``; None: the ops and inputs are
    summed, as in a derived 3M-Pose network)."""

    genotype: Genotype
    weights: Optional[dict[int, CellWeights]] = None

    def __post_init__(self) -> None:
        self.genotype = self.genotype.prune()
        if self.weights is None:
            return
        live = {c.index: c for c in self.genotype.cells if not c.pruned}
        if set(self.weights) != set(live):
            raise GenotypeError(f"architecture weights are given for cells {sorted(self.weights)}, "
                                f"the genotype's live cells are {sorted(live)}")
        for index, w in self.weights.items():
            cell = live[index]
            if len(w.paths) != len(cell.inputs) or [len(e) for e in w.edges] != [len(e) for e in cell.edges]:
                raise GenotypeError(f"{cell.name}: weights {w.paths} / {w.edges} do not match its inputs "
                                    f"{cell.inputs} and edges {cell.edges}")
            if not all(math.isfinite(v) and v >= 0 for v in (*w.paths, *(x for e in w.edges for x in e))):
                raise GenotypeError(f"{cell.name}: architecture weights must be finite and >= 0")

    def to_dict(self) -> dict:
        """``{"layout": "fabric" | "pyramid", "genotype": {...}, "weights": [...] | null}``."""
        weights = None
        if self.weights is not None:
            weights = [{"index": i, "paths": w.paths, "edges": w.edges} for i, w in sorted(self.weights.items())]
        layout = "pyramid" if isinstance(self.genotype, PyramidGenotype) else "fabric"
        return {"layout": layout, "genotype": self.genotype.to_dict(), "weights": weights}

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "FabricArchitecture":
        """Validate a :meth:`to_dict` object; errors name ``source``."""
        if not isinstance(raw, dict) or raw.get("layout") not in ("fabric", "pyramid") or "genotype" not in raw:
            raise GenotypeError(f"{source}: a fabric architecture is an object with 'layout' "
                                "('fabric' or 'pyramid'), 'genotype' and 'weights'")
        genotype_cls = PyramidGenotype if raw["layout"] == "pyramid" else Genotype
        genotype = genotype_cls.from_dict(raw["genotype"], source)
        weights = raw.get("weights")
        if weights is not None:
            try:
                weights = {int(w["index"]): CellWeights([float(v) for v in w["paths"]],
                                                        [[float(v) for v in e] for e in w["edges"]])
                           for w in weights}
            except (TypeError, KeyError, ValueError) as e:
                raise GenotypeError(f"{source}: 'weights' must be a list of {{index, paths, edges}} "
                                    f"with numbers ({type(e).__name__}: {e})") from None
        try:
            return cls(genotype, weights)
        except GenotypeError as e:
            raise GenotypeError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- #
# Searchable and fixed fabrics
# --------------------------------------------------------------------------- #
class SearchableFabric(nn.Module):
    """Every candidate op and input of a fabric, and its own architecture parameters.

    Args:
        kind: ``"backbone"`` or ``"part"`` (:func:`full_genotype`).
        rows, layers, hidden, channels, ops: the fabric.
        r_alpha, r_beta: Dyn-EGS states (ops per edge, inputs per cell).
        share_alpha: one alpha per fabric (PNFS) or per cell.
        sampling: ``"dense"`` (PNFS), ``"dyn_egs"`` or ``"argmax"`` (3M-Pose).
        options: the cells' :class:`~threempose.config.CellOptions`.
        dyn_egs_sampling: ``"topk"`` or ``"ensemble"`` (:mod:`threempose.nas.dyn_egs`).

    ``forward(feats, tau, seed)``: ``feats`` as :class:`CellFabric` -> the output rows. Module
    names (``fabric.cells.<index>...``) are those of :class:`FixedFabric`, so a fixed fabric's
    ``state_dict`` keys are a subset of its searchable fabric's.
    """

    def __init__(self, kind: str, rows: int, layers: int, hidden: int, channels: int,
                 ops: Sequence[str], r_alpha: int = 2, r_beta: int = 3, share_alpha: bool = True,
                 sampling: SamplingMode = "dense", options: CellOptions = CellOptions(),
                 dyn_egs_sampling: str = "topk") -> None:
        super().__init__()
        if not 1 <= r_alpha <= len(ops):
            raise ValueError(f"r_alpha must be in 1..{len(ops)} (the number of ops), got {r_alpha}")
        if not 1 <= r_beta <= 3:
            raise ValueError(f"r_beta must be in 1..3 (above, parallel, below), got {r_beta}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {sampling!r}; use one of {list(SAMPLING_MODES)}")
        self.fabric = CellFabric(full_genotype(kind, rows, layers, hidden, channels, ops, options))
        self.ops = list(ops)
        self.sampling: SamplingMode = sampling
        g = self.fabric.genotype
        self.arch = FabricArch(g.layout, len(edge_endpoints(hidden)), len(self.ops), r_alpha, r_beta,
                               share_alpha, dyn_egs_sampling)

    @property
    def genotype(self) -> Genotype:
        """The search space (every live cell with every op and input)."""
        return self.fabric.genotype

    def arch_parameters(self) -> list[nn.Parameter]:
        """This fabric's (shared_)alpha, beta, m_alpha, m_beta."""
        return self.arch.parameters_list()

    def sample(self, tau: float = 1.0, seed: Optional[int] = None,
               mode: Optional[SamplingMode] = None) -> ArchSample:
        """Draw an architecture (``mode`` defaults to ``self.sampling``; ``dyn_egs`` needs ``seed``)."""
        mode = mode or self.sampling
        if mode == "dyn_egs" and seed is None:
            raise ValueError("dyn_egs sampling needs a seed (an int in [0, 2**62))")
        return self.arch.sample(mode, tau, None if seed is None else seed % MAX_SEED)

    def genotype_of(self, sample: ArchSample) -> Genotype:
        """The architecture of ``sample`` as a pruned genotype (same layout as the search space)."""
        g = self.genotype
        cells = [replace(c, inputs=[INPUT_NAMES[p] for p in sample.paths[c.index]],
                         edges=[[self.ops[k] for k in edge] for edge in sample.ops[c.index]])
                 if not c.pruned else c for c in g.cells]
        return replace(g, cells=cells).prune()

    def forward(self, feats: Mapping[int, Tensor], tau: float = 1.0,
                seed: Optional[int] = None) -> dict[int, Tensor]:
        """Sample an architecture (``self.sampling``) and run it over ``feats``."""
        sample = self.sample(tau, seed)
        return self.fabric(feats, sample_weights(sample, self.ops), self.genotype_of(sample))

    def normalised_weights(self) -> ArchSample:
        """The dense weights: ``softmax(alpha)`` per edge, ``softmax(beta)`` per cell with copy
        slots merged into the neighbour they copy (PNFS Eq. 1-2)."""
        return self.arch.sample("dense", 1.0)

    def prune(self, threshold: float) -> FabricArchitecture:
        """PNFS §III-F: drop ops and inputs whose normalised weight is below ``threshold``, then
        the cells that no longer reach the output; keep the other weights unchanged. A ``zero``
        op is dropped too wherever another op of its edge stays (it adds nothing); an edge
        left with ``zero`` alone keeps it (the edge contributes nothing, at no cost).

        ``threshold`` must be below ``1 / max(K, 3)`` so that every edge keeps an op and every
        cell an input. Returns the pruned architecture (genotype + weights).
        """
        if not 0.0 <= threshold < 1.0 / max(len(self.ops), 3):
            raise ValueError(f"prune threshold must be in [0, 1/{max(len(self.ops), 3)}) so that every "
                             f"edge keeps an op and every cell an input, got {threshold}")
        with torch.no_grad():
            sample = self.normalised_weights()
        ops_w, paths_w = sample.op_weights.cpu().tolist(), sample.path_weights.cpu().tolist()
        cells, kept = [], {}
        for c in self.genotype.cells:
            if c.pruned:
                cells.append(c)
                continue
            inputs = [p for p in c.inputs if paths_w[c.index][INPUT_NAMES.index(p)] >= threshold]
            edges = [_drop_zero([o for o in edge if ops_w[c.index][e][self.ops.index(o)] >= threshold])
                     for e, edge in enumerate(c.edges)]
            cells.append(replace(c, inputs=inputs, edges=edges))
            kept[c.index] = CellWeights([paths_w[c.index][INPUT_NAMES.index(p)] for p in inputs],
                                        [[ops_w[c.index][e][self.ops.index(o)] for o in edge]
                                         for e, edge in enumerate(edges)])
        genotype = replace(self.genotype, cells=cells).prune()
        live = {c.index for c in genotype.cells if not c.pruned}
        return FabricArchitecture(genotype, {i: w for i, w in kept.items() if i in live})

    def derive(self) -> FabricArchitecture:
        """The 3M-Pose derivation: argmax on m, top-(i+1) of alpha and beta; ops summed."""
        with torch.no_grad():
            return FabricArchitecture(self.genotype_of(self.sample(mode="argmax")))


def _drop_zero(edge: list[str]) -> list[str]:
    """``edge`` without ``"zero"`` unless it is the edge's only op."""
    rest = [o for o in edge if o != "zero"]
    return rest or edge


class FixedFabric(nn.Module):
    """One fabric architecture with fixed weights (:class:`FabricArchitecture`).

    ``forward(feats, tau=None, seed=None)``: ``feats`` as :class:`CellFabric` -> output rows
    (``tau`` and ``seed`` are accepted for symmetry with :class:`SearchableFabric` and ignored).
    The weights are non-persistent buffers: they come from the architecture, not a state_dict.
    """

    def __init__(self, architecture: FabricArchitecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.fabric = CellFabric(architecture.genotype)
        self._weighted = architecture.weights is not None
        if self._weighted:
            for index, w in architecture.weights.items():
                self.register_buffer(f"paths_{index}", torch.tensor(w.paths), persistent=False)
                for e, edge in enumerate(w.edges):
                    self.register_buffer(f"edge_{index}_{e}", torch.tensor(edge), persistent=False)

    @property
    def genotype(self) -> Genotype:
        return self.fabric.genotype

    def _weights(self, cell: CellGene) -> CellChoice:
        i = cell.index
        return CellChoice(paths=cell.inputs, path_weights=getattr(self, f"paths_{i}"), edges=cell.edges,
                          edge_weights=[getattr(self, f"edge_{i}_{e}") for e in range(len(cell.edges))])

    def forward(self, feats: Mapping[int, Tensor], tau: Optional[float] = None,
                seed: Optional[int] = None) -> dict[int, Tensor]:
        return self.fabric(feats, self._weights if self._weighted else None)
