"""Genotypes: the fabric's geometry and a searched architecture as JSON (format 1).

The fabric (thesis §3.1.1, PNFS §III-B) is a grid of cells: ``rows`` scales
(row ``r`` at 1/(4*2**r) of the input, ``channels * 2**r`` wide) by ``layers``
columns. Layer ``l`` has rows ``0 .. min(l, rows-1)`` (for 4 x 10: layer 1 has rows
0-1, layer 2 rows 0-2, layers 3-10 all four rows: 37 cells). Cells are numbered
column by column, top row first (the thesis' Table A.1 numbering). "Layer 0" is
the stem: one 1/4-scale, ``channels``-wide stream in row 0. So a layer-1 cell in
row 0 takes the stem as its *parallel* input and the layer-1 cell in row 1 as
its *above* input.

A cell's inputs are neighbours in the previous layer: ``above`` (row ``r-1``,
higher resolution), ``parallel`` (row ``r``) and ``below`` (row ``r+1``). A
neighbour outside the fabric (row -1, a row not yet opened) is *missing*. In the
supernet, a missing neighbour's slot is a copy of an existing one (PNFS
footnote 2): of ``parallel`` when that exists, otherwise of ``above`` (see
:meth:`FabricLayout.resolve`; ``above`` always exists when ``parallel`` does not).
A genotype names only real neighbours: deriving maps a chosen copy slot to the
neighbour it copies (so the thesis' cell 3, "parallel + above + below" at layer
2 row 1 where row 2 of layer 1 does not exist, is ``["parallel", "above"]``).

Hidden nodes (thesis Eq. 3.6 with the edges of Table A.1, PNFS Eq. 1): node
``h_0`` is the cell input, node ``h_j`` (``j = 1..H``) sums the ops on the edges
from every earlier node ``h_0 .. h_{j-1}``. Edges are listed by target node,
then source: for H = 2, O^0: I -> h1, O^1: I -> h2, O^2: h1 -> h2
(:func:`edge_endpoints`).

JSON, format 1::

    {"format": "threempose.genotype/1", "rows": 4, "layers": 10, "hidden": 2,
     "channels": 32, "eels": [4, 7], "fuse_split": true,
     "cells": [{"index": 0, "layer": 1, "row": 0, "inputs": ["parallel"],
                "edges": [["max_pool", "avg_pool"], ["max_pool", "avg_pool"], ["identity"]]},
               ...]}

``inputs`` is a subset of ``above``, ``parallel``, ``below``; empty means the cell is
pruned, and its ``edges`` are then ``[]``. ``edges`` lists the op names on each edge
in the order above. ``fuse_split`` is optional (default true; false is the thesis'
ablation with heads on row 0 only), and so is ``cell_options`` (an object with any of
``hidden_sum``, ``se_reduction``, ``sep_conv_repeats``: :class:`~threempose.config.CellOptions`,
its defaults where absent). Every error names the cell it is about.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from threempose.config import CellOptions
from threempose.nas.ops import OP_NAMES
from threempose.util.errors import UserError
from threempose.util.files import atomic_open, read_json_file

GENOTYPE_FORMAT = "threempose.genotype/1"
INPUT_NAMES: tuple[str, ...] = ("above", "parallel", "below")
ROW_STEP = {"above": -1, "parallel": 0, "below": 1}  # row of each neighbour, relative


class GenotypeError(UserError, ValueError):
    """A genotype is malformed; the message names the file and the cell."""


def edge_endpoints(hidden: int) -> list[tuple[int, int]]:
    """``(source, target)`` node of every edge of a cell with ``hidden`` hidden nodes, in
    genotype order (node 0 is the cell input). ``H = 2 -> [(0, 1), (0, 2), (1, 2)]``."""
    return [(src, dst) for dst in range(1, hidden + 1) for src in range(dst)]


@dataclass(frozen=True)
class CellPosition:
    """Where cell ``index`` sits: ``layer`` in 1..L, ``row`` in 0..R-1."""

    index: int
    layer: int
    row: int


class FabricLayout:
    """The cells of a ``rows x layers`` fabric and who feeds whom.

    Usage::

        layout = FabricLayout(4, 10)
        len(layout.cells)                         # 37
        layout.source(layout.cells[1], "above")   # (0, 0): the stem
        layout.resolve(layout.cells[3], "below")  # "parallel" (a copy: row 2 of layer 1 is missing)
    """

    def __init__(self, rows: int, layers: int) -> None:
        self.rows = rows
        self.layers = layers
        self.cells: tuple[CellPosition, ...] = tuple(
            CellPosition(i, layer, row)
            for i, (layer, row) in enumerate(
                (layer, row) for layer in range(1, layers + 1) for row in range(self.rows_in_layer(layer))))
        self._index = {(c.layer, c.row): c.index for c in self.cells}

    def rows_in_layer(self, layer: int) -> int:
        """Number of rows of ``layer`` (layer 0, the stem, has one)."""
        return min(layer, self.rows - 1) + 1

    def index(self, layer: int, row: int) -> Optional[int]:
        """The index of the cell at ``(layer, row)``, or None (no such cell; layer 0 is the stem)."""
        return self._index.get((layer, row))

    def source(self, cell: CellPosition, name: str) -> Optional[tuple[int, int]]:
        """``(layer, row)`` that input ``name`` of ``cell`` comes from (``(0, 0)`` is the stem),
        or None when that neighbour is outside the fabric."""
        row = cell.row + ROW_STEP[name]
        if 0 <= row < self.rows_in_layer(cell.layer - 1):
            return cell.layer - 1, row
        return None

    def resolve(self, cell: CellPosition, name: str) -> str:
        """The real neighbour behind input slot ``name``: ``name`` itself when it exists, else
        the copy that replaces it (PNFS footnote 2): ``parallel`` if it exists, else ``above``."""
        if self.source(cell, name) is not None:
            return name
        return "parallel" if self.source(cell, "parallel") is not None else "above"

    @staticmethod
    def row_size(input_hw: tuple[int, int], row: int) -> tuple[int, int]:
        """Feature-map size of ``row`` for an ``H x W`` image: ``ceil(H / 2**(row+2))`` x
        ``ceil(W / 2**(row+2))`` (what the stride-2 convs produce; no padding anywhere). Integer
        arithmetic only, so it also works on symbolic sizes (``torch.export``)."""
        f = 2 ** (row + 2)
        return -(-input_hw[0] // f), -(-input_hw[1] // f)


@dataclass
class CellGene:
    """One cell of a genotype: its chosen input neighbours and the ops on each edge."""

    index: int
    layer: int
    row: int
    inputs: list[str]
    edges: list[list[str]]

    @property
    def pruned(self) -> bool:
        return not self.inputs

    @property
    def name(self) -> str:
        return f"cell {self.index} (layer {self.layer}, row {self.row})"


@dataclass
class Genotype:
    """A fabric architecture: every cell's inputs and ops (see the module docstring).

    Constructing one validates it (:class:`GenotypeError` names the bad cell).
    ``to_json() / save(path) / Genotype.load(path)`` round-trip it.
    """

    rows: int
    layers: int
    hidden: int
    channels: int
    eels: list[int]
    cells: list[CellGene]
    fuse_split: bool = True
    cell_options: CellOptions = CellOptions()
    layout: FabricLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ queries
    @property
    def exit_layers(self) -> list[int]:
        """Layers with an exit: the EELs, then the last layer."""
        return [*self.eels, self.layers]

    def cells_in_layer(self, layer: int) -> list[CellGene]:
        """The unpruned cells of ``layer``, top row first."""
        return [c for c in self.cells if c.layer == layer and not c.pruned]

    def input_cell(self, cell: CellGene, name: str) -> Optional[CellGene]:
        """The cell that feeds input ``name`` of ``cell`` (None for the stem)."""
        layer, row = self.layout.source(self.layout.cells[cell.index], name)
        index = self.layout.index(layer, row)
        return None if index is None else self.cells[index]

    def feeds_exit(self, cell: CellGene) -> bool:
        """Whether an exit reads ``cell`` directly (Fuse reads every row; without
        Fuse-Split the head reads row 0)."""
        return cell.layer in self.exit_layers and (self.fuse_split or cell.row == 0)

    def live_cells(self) -> set[int]:
        """Indices of unpruned cells whose output reaches an exit."""
        live: set[int] = set()
        for cell in reversed(self.cells):
            if cell.pruned:
                continue
            if self.feeds_exit(cell) or any(
                    consumer.index in live for consumer in self._consumers(cell)):
                live.add(cell.index)
        return live

    def prune(self) -> "Genotype":
        """A copy in which every cell whose output reaches no exit is pruned."""
        live = self.live_cells()
        cells = [c if c.index in live else replace(c, inputs=[], edges=[]) for c in self.cells]
        return replace(self, cells=cells)

    def _consumers(self, cell: CellGene) -> list[CellGene]:
        out = []
        for name in INPUT_NAMES:
            # the neighbour that would read `cell` through its input `name`
            index = self.layout.index(cell.layer + 1, cell.row - ROW_STEP[name])
            if index is not None and name in self.cells[index].inputs:
                out.append(self.cells[index])
        return out

    # --------------------------------------------------------------- validation
    def _validate(self) -> None:
        for key in ("rows", "layers", "hidden", "channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenotypeError(f"'{key}' must be an integer >= 1, got {value!r}")
        if (not isinstance(self.eels, list) or sorted(set(self.eels)) != self.eels
                or any(isinstance(e, bool) or not isinstance(e, int) or not 1 <= e < self.layers
                       for e in self.eels)):
            raise GenotypeError(f"'eels' must be increasing layers in 1..{self.layers - 1}, got {self.eels!r}")
        self.layout = FabricLayout(self.rows, self.layers)
        expected = self.layout.cells
        if len(self.cells) != len(expected):
            raise GenotypeError(f"a {self.rows} x {self.layers} fabric has {len(expected)} cells "
                                f"(0..{len(expected) - 1}), the genotype lists {len(self.cells)}")
        n_edges = len(edge_endpoints(self.hidden))
        for pos, cell in zip(expected, self.cells):
            if (cell.index, cell.layer, cell.row) != (pos.index, pos.layer, pos.row):
                raise GenotypeError(
                    f"cells[{pos.index}] is cell {cell.index} at layer {cell.layer}, row {cell.row}; "
                    f"the fabric's cell {pos.index} is at layer {pos.layer}, row {pos.row} "
                    f"(cells are numbered column by column, top row first, and listed in order)")
            self._validate_cell(cell, n_edges)
        for cell in self.cells:
            for name in cell.inputs:
                feeder = self.input_cell(cell, name)
                if feeder is not None and feeder.pruned:
                    raise GenotypeError(f"{cell.name}: input '{name}' comes from {feeder.name}, "
                                        f"which is pruned")
        for layer in self.exit_layers:
            if not any(self.feeds_exit(c) for c in self.cells_in_layer(layer)):
                what = "every cell" if self.fuse_split else "the row-0 cell"
                raise GenotypeError(f"the exit at layer {layer} has no input: {what} of layer {layer} "
                                    f"is pruned")

    def _validate_cell(self, cell: CellGene, n_edges: int) -> None:
        where = self.layout.cells[cell.index]
        if (not isinstance(cell.inputs, list) or any(name not in INPUT_NAMES for name in cell.inputs)
                or len(set(cell.inputs)) != len(cell.inputs)):
            raise GenotypeError(f"{cell.name}: 'inputs' must be distinct names from "
                                f"{list(INPUT_NAMES)}, got {cell.inputs!r}")
        for name in cell.inputs:
            if self.layout.source(where, name) is None:
                raise GenotypeError(f"{cell.name}: input '{name}' is outside the fabric "
                                    f"(no cell at layer {cell.layer - 1}, row {cell.row + ROW_STEP[name]})")
        if not isinstance(cell.edges, list):
            raise GenotypeError(f"{cell.name}: 'edges' must be a list, got {cell.edges!r}")
        if cell.pruned:
            if cell.edges:
                raise GenotypeError(f"{cell.name}: a pruned cell (no inputs) must have no edges, "
                                    f"got {cell.edges!r}")
            return
        if len(cell.edges) != n_edges:
            raise GenotypeError(f"{cell.name}: H = {self.hidden} hidden nodes need {n_edges} edges, "
                                f"got {len(cell.edges)}")
        for e, ops in enumerate(cell.edges):
            if (not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops)
                    or len(set(ops)) != len(ops)):
                raise GenotypeError(f"{cell.name}: edge {e} must be a non-empty list of distinct op "
                                    f"names, got {ops!r}")
            for op in ops:
                if op not in OP_NAMES:
                    raise GenotypeError(f"{cell.name}: edge {e} has unknown op {op!r}; "
                                        f"known ops: {', '.join(OP_NAMES)}")

    # --------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The format-1 JSON object."""
        return {"format": GENOTYPE_FORMAT, "rows": self.rows, "layers": self.layers,
                "hidden": self.hidden, "channels": self.channels, "eels": list(self.eels),
                "fuse_split": self.fuse_split, "cell_options": asdict(self.cell_options),
                "cells": [{"index": c.index, "layer": c.layer, "row": c.row,
                           "inputs": list(c.inputs), "edges": [list(e) for e in c.edges]}
                          for c in self.cells]}

    def to_json(self) -> str:
        """The genotype as format-1 JSON text, one cell per line."""
        d = self.to_dict()
        cells = ",\n".join("    " + json.dumps(c) for c in d.pop("cells"))
        head = json.dumps(d)[:-1]
        return f'{head},\n  "cells": [\n{cells}\n  ]}}\n'

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        with atomic_open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<genotype>") -> "Genotype":
        """Validate a parsed format-1 object (copied, not aliased); errors are prefixed with ``source``."""
        try:
            return cls._from_dict(copy.deepcopy(raw))
        except GenotypeError as e:
            raise GenotypeError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Genotype":
        """Read and validate a format-1 genotype file."""
        return cls.from_dict(read_json_file(path, GenotypeError, "genotype file"), str(path))

    @classmethod
    def _from_dict(cls, raw: Any) -> "Genotype":
        if not isinstance(raw, dict):
            raise GenotypeError(f"a genotype is a JSON object, got {type(raw).__name__}")
        if raw.get("format") != GENOTYPE_FORMAT:
            raise GenotypeError(f"'format' must be {GENOTYPE_FORMAT!r}, got {raw.get('format')!r}")
        required = {"format", "rows", "layers", "hidden", "channels", "eels", "cells"}
        _check_keys(raw, required, required | {"fuse_split", "cell_options"}, "the genotype")
        if not isinstance(raw.get("fuse_split", True), bool):
            raise GenotypeError(f"'fuse_split' must be true or false, got {raw['fuse_split']!r}")
        options = _cell_options(raw.get("cell_options", {}))
        if not isinstance(raw["cells"], list):
            raise GenotypeError(f"'cells' must be a list, got {raw['cells']!r}")
        cells = []
        for i, c in enumerate(raw["cells"]):
            if not isinstance(c, dict):
                raise GenotypeError(f"cells[{i}] must be an object, got {c!r}")
            keys = {"index", "layer", "row", "inputs", "edges"}
            _check_keys(c, keys, keys, f"cell {c.get('index', f'cells[{i}]')}")
            cells.append(CellGene(c["index"], c["layer"], c["row"], c["inputs"], c["edges"]))
        return cls(rows=raw["rows"], layers=raw["layers"], hidden=raw["hidden"],
                   channels=raw["channels"], eels=raw["eels"], cells=cells,
                   fuse_split=raw.get("fuse_split", True), cell_options=options)

    # ----------------------------------------------------------------- display
    def to_markdown(self) -> str:
        """The genotype as the thesis' Table A.1 (a markdown table, pruned cells as "-")."""
        n_edges = len(edge_endpoints(self.hidden))
        header = ["Cell", "Layer", "Row", "Inputs"] + [f"O^{e}" for e in range(n_edges)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in self.cells:
            if c.pruned:
                cols = ["-"] * (1 + n_edges)
            else:
                cols = [" + ".join(c.inputs)] + [" + ".join(OP_LABELS[o] for o in ops) for ops in c.edges]
            lines.append("| " + " | ".join([str(c.index), str(c.layer), str(c.row)] + cols) + " |")
        return "\n".join(lines) + "\n"


OP_LABELS = {"identity": "Identity", "conv": "Conv", "avg_pool": "Avg", "max_pool": "Max",
             "residual": "Residual", "sep_conv": "SepConv", "csi": "CSI", "zoom_conv": "ZoomConv",
             "se": "SE", "zero": "Zero", "dil_conv": "DilConv"}
"""The thesis' short op names (Table A.1); PNFS' zero and dilated conv named alike."""


def _cell_options(raw: Any) -> CellOptions:
    """A genotype's ``cell_options`` object -> :class:`CellOptions` (absent keys: the defaults)."""
    if not isinstance(raw, dict):
        raise GenotypeError(f"'cell_options' must be an object, got {raw!r}")
    defaults = CellOptions()
    _check_keys(raw, set(), {f.name for f in fields(CellOptions)}, "'cell_options'")
    for key, value in raw.items():
        want = type(getattr(defaults, key))
        if type(value) is not want or (want is int and value < 1):
            raise GenotypeError(f"'cell_options.{key}' must be {'an integer >= 1' if want is int else 'true or false'}, "
                                f"got {value!r}")
    return CellOptions(**raw)


def _check_keys(obj: dict, required: set[str], allowed: set[str], what: str) -> None:
    missing = sorted(required - set(obj))
    if missing:
        raise GenotypeError(f"{what}: missing key '{missing[0]}'")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise GenotypeError(f"{what}: unknown key '{unknown[0]}' (known: {', '.join(sorted(allowed))})")
