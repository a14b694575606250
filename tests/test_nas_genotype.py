"""Genotype format 1: fabric geometry, validation errors naming the cell, pruning, round trip,
and the shipped thesis architecture (Table A.1)."""
import json
from pathlib import Path

import pytest

from threempose.config import CellOptions
from threempose.nas.genotype import FabricLayout, Genotype, GenotypeError

THESIS = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "3m-pose-thesis.json"
TABLE_A1 = Path(__file__).resolve().parent / "data" / "thesis_table_a1.txt"
# Table A.1's op names -> the genotype's (thesis §3.2.2 and the table caption)
TABLE_OPS = {"Identity": "identity", "Conv": "conv", "Avg": "avg_pool", "Max": "max_pool",
             "Residual": "residual", "SepConv": "sep_conv", "CSI": "csi", "ZoomConv": "zoom_conv", "SE": "se"}


def small_genotype_dict() -> dict:
    """3 rows x 3 layers, EEL at 2: cells 0-1 (layer 1), 2-4 (layer 2), 5-7 (layer 3)."""
    def cell(i, layer, row, inputs, edges=(["conv"], ["identity", "se"], ["max_pool"])):
        return {"index": i, "layer": layer, "row": row, "inputs": inputs,
                "edges": [list(e) for e in edges] if inputs else []}
    return {"format": "threempose.genotype/1", "rows": 3, "layers": 3, "hidden": 2, "channels": 4,
            "eels": [2], "cells": [
                cell(0, 1, 0, ["parallel"]), cell(1, 1, 1, ["above"]),
                cell(2, 2, 0, ["parallel", "below"]), cell(3, 2, 1, ["above"]), cell(4, 2, 2, ["above"]),
                cell(5, 3, 0, ["parallel"]), cell(6, 3, 1, ["parallel", "below"]), cell(7, 3, 2, ["above"])]}


def test_layout_numbers_cells_column_by_column_top_row_first():
    layout = FabricLayout(4, 10)
    assert len(layout.cells) == 37
    assert [(c.layer, c.row) for c in layout.cells[:9]] == [
        (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert layout.cells[36].layer == 10 and layout.cells[36].row == 3
    assert layout.source(layout.cells[0], "parallel") == (0, 0)          # the stem
    assert layout.source(layout.cells[1], "above") == (0, 0)
    assert layout.source(layout.cells[3], "below") is None              # row 2 of layer 1
    # copies (PNFS footnote 2): parallel when it exists, else above
    assert layout.resolve(layout.cells[3], "below") == "parallel"
    assert layout.resolve(layout.cells[5], "above") == "parallel"
    assert layout.resolve(layout.cells[4], "parallel") == "above"
    assert layout.resolve(layout.cells[8], "below") == "above"
    assert FabricLayout.row_size((70, 50), 0) == (18, 13)
    assert FabricLayout.row_size((70, 50), 2) == (5, 4)


def test_round_trip(tmp_path):
    g = Genotype.from_dict(small_genotype_dict())
    g.save(tmp_path / "g.json")
    again = Genotype.load(tmp_path / "g.json")
    assert again == g
    assert again.to_dict() == {**small_genotype_dict(), "fuse_split": True, "cell_options": {
        "hidden_sum": False, "se_reduction": 4, "sep_conv_repeats": 1}}        # the defaults, written out
    raw = {**small_genotype_dict(), "cell_options": {"hidden_sum": True, "sep_conv_repeats": 2}}
    assert Genotype.from_dict(raw).cell_options == CellOptions(hidden_sum=True, se_reduction=4, sep_conv_repeats=2)


def test_prune_removes_cells_that_reach_no_exit():
    raw = small_genotype_dict()
    g = Genotype.from_dict(raw)
    # layer-2 cells all feed the EEL's Fuse; cell 1 feeds cells 2 (below) and 3, 4 (above)
    assert g.live_cells() == set(range(8))
    raw["fuse_split"] = False        # heads read row 0 only
    g = Genotype.from_dict(raw)
    assert g.live_cells() == {0, 1, 2, 5}
    pruned = g.prune()
    assert [c.index for c in pruned.cells if c.pruned] == [3, 4, 6, 7]
    assert pruned.cells[3].edges == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cells"][3]["edges"][1].append("dilated_conv"), "cell 3 .*unknown op 'dilated_conv'"),
    (lambda d: d["cells"][6]["edges"].pop(), "cell 6 .*need 3 edges, got 2"),
    (lambda d: d["cells"][0]["inputs"].append("above"), "cell 0 .*'above' is outside the fabric"),
    (lambda d: d["cells"][7]["inputs"].append("below"), "cell 7 .*'below' is outside the fabric"),
    (lambda d: d["cells"][2]["inputs"].append("sideways"), "cell 2 .*'inputs' must be"),
    (lambda d: d["cells"][5]["edges"][0].clear(), "cell 5 .*edge 0 must be a non-empty list"),
    (lambda d: d["cells"][5]["edges"][2].append("max_pool"), "cell 5 .*edge 2 .*distinct"),
    (lambda d: d["cells"][4].update(inputs=[]), "cell 4 .*pruned cell .*no edges"),
    (lambda d: d["cells"][1].update(inputs=[], edges=[]), "cell 2 .*'below' comes from cell 1 .*pruned"),
    (lambda d: d["cells"][5].update(layer=2), r"cells\[5\] is cell 5 at layer 2"),
    (lambda d: d["cells"][2].pop("edges"), "cell 2: missing key 'edges'"),
    (lambda d: d["cells"][2].update(weights=[1]), "cell 2: unknown key 'weights'"),
    (lambda d: d.update(format="threempose.genotype/2"), "'format' must be"),
    (lambda d: d.update(cell_options={"se_reduction": 0}), "'cell_options.se_reduction' must be an integer >= 1"),
    (lambda d: d.update(cell_options={"hidden_sum": 1}), "'cell_options.hidden_sum' must be true or false"),
    (lambda d: d.update(cell_options={"se_ratio": 4}), "'cell_options': unknown key 'se_ratio'"),
    (lambda d: d.update(eels=[3]), "'eels'"),
    (lambda d: d["cells"].pop(), "has 8 cells"),
    (lambda d: [d["cells"][i].update(inputs=[], edges=[]) for i in (5, 6, 7)], "exit at layer 3 has no input"),
])
def test_malformed_genotypes_are_errors_naming_the_cell(tmp_path, edit, message):
    raw = small_genotype_dict()
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(GenotypeError, match=message) as info:
        Genotype.load(path)
    assert str(path) in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GenotypeError, match="not found"):
        Genotype.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(GenotypeError, match="x.json: not valid JSON"):
        Genotype.load(tmp_path / "x.json")


def test_thesis_genotype_is_table_a1_with_cell_2_pruned():
    g = Genotype.load(THESIS)
    assert (g.rows, g.layers, g.hidden, g.channels, g.eels) == (4, 10, 2, 32, [4, 7])
    assert [c.index for c in g.cells if c.pruned] == [2]
    assert g.live_cells() == set(range(37)) - {2}
    assert g.cells[0].inputs == ["parallel"]
    assert g.cells[0].edges == [["max_pool", "avg_pool"], ["max_pool", "avg_pool"], ["identity"]]
    # "parallel + above + below" where row 2 of layer 1 does not exist: below copies parallel
    assert g.cells[3].inputs == ["parallel", "above"]
    assert g.cells[11].edges == [["residual", "zoom_conv"], ["identity", "residual"], ["avg_pool", "residual"]]
    assert g.cells[36].inputs == ["parallel"]
    assert g.cells[36].edges == [["csi", "zoom_conv"], ["zoom_conv", "sep_conv"], ["avg_pool", "residual"]]
    table = g.to_markdown()
    assert "| 0 | 1 | 0 | parallel | Max + Avg | Max + Avg | Identity |" in table
    assert "| 2 | 2 | 0 | - | - | - | - |" in table


def read_table_a1() -> list[tuple[int, list[str], list[list[str]]]]:
    """``(cell number, inputs, [O^0, O^1, O^2] op lists)`` per row of the verbatim text fixture."""
    rows = []
    for line in TABLE_A1.read_text().splitlines():
        if line.startswith("#") or line.startswith("Cell No."):
            continue
        number, inputs, *ops = line.split("\t")
        if inputs == "-":
            assert ops == ["-"] * 3, line
            rows.append((int(number), [], []))
        else:
            rows.append((int(number), inputs.split(" + "),
                         [[TABLE_OPS[name] for name in edge.split(" + ")] for edge in ops]))
    return rows


def test_thesis_genotype_matches_every_row_of_table_a1():
    """All 37 cells of the shipped genotype against the table's text: the inputs once each copy
    slot (a neighbour outside the fabric) is resolved to the neighbour it copies, the ops in the
    table's order."""
    g = Genotype.load(THESIS)
    layout = FabricLayout(g.rows, g.layers)
    table = read_table_a1()
    assert [number for number, _, _ in table] == list(range(37)) == [c.index for c in g.cells]
    for (number, inputs, edges), cell in zip(table, g.cells):
        resolved = list(dict.fromkeys(layout.resolve(layout.cells[number], name) for name in inputs))
        assert (cell.inputs, cell.edges) == (resolved, edges), f"cell {number}"


def test_from_dict_copies_its_input():
    raw = small_genotype_dict()
    g = Genotype.from_dict(raw)
    raw["cells"][0]["edges"][0].append("se")
    raw["cells"][0]["inputs"].clear()
    assert g.cells[0].inputs == ["parallel"] and g.cells[0].edges[0] == ["conv"]
