"""Params and GFLOPs (multiply-adds) of networks per exit, measured latency from a table, and the
fabric drawing (thesis Table A.1 / Fig. A.1): the library behind ``python -m threempose.profile``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from threempose.measure.latency import network_ms
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import FabricNet
from threempose.nas.genotype import OP_LABELS, Genotype
from threempose.nas.latency_table import LatencyTable, LatencyTableError
from threempose.nas.supernet import Supernet
from threempose.util.files import atomic_open
from threempose.util.threads import torch_threads


def profile_network(net: FabricNet, input_hw: tuple[int, int],
                    latency: Optional[LatencyTable] = None) -> dict[str, Any]:
    """``{"params_m", "gflops", "exits": [{"layer", "gflops", "params_m"}]}`` of a fabric
    network's weights (architecture parameters excluded) at ``input_hw`` = ``(H, W)``; with a
    ``latency`` table also ``"latency_ms"`` (predicted) overall and per exit."""
    gflops = net.exit_gflops(input_hw)
    params = net.exit_params()
    ms = net.exit_costs(latency, input_hw) if latency is not None else None
    last = max(gflops)
    report = {"params_m": params[last] / 1e6, "gflops": gflops[last],
              "exits": [{"layer": layer, "gflops": gflops[layer], "params_m": params[layer] / 1e6,
                         **({"latency_ms": ms[layer]} if ms else {})} for layer in gflops]}
    if ms:
        report["latency_ms"] = ms[last]
    return report


def profile_genotype(genotype: Genotype, input_hw: tuple[int, int], num_joints: int = 17,
                     stem_blocks: int = 4, latency: Optional[LatencyTable] = None) -> dict[str, Any]:
    """:func:`profile_network` of the derived network of ``genotype``."""
    return profile_network(DerivedNet(genotype, num_joints, stem_blocks), input_hw, latency)


def measure_latency(genotype: Genotype, table: LatencyTable, reps: int = 30) -> dict[int, float]:
    """Measured ms to each exit of ``genotype``'s network on this machine, as ``table`` was
    measured (its device, which must be this machine's, threads, batch, timer, form, input size):
    ``{layer: ms}``."""
    if table.device == "cuda" and not torch.cuda.is_available():
        raise LatencyTableError(f"{table.source} was measured on {table.device_name}; this machine has no GPU")
    table.check_device(table.device)
    net = DerivedNet(genotype, table.fabric["num_joints"], table.fabric["stem_blocks"])
    with torch_threads(table.meta.get("threads")):
        return network_ms({"net": net}, table.input_hw, table.device, int(table.meta.get("batch", 1)), reps=reps,
                          exits=True, timer=table.meta.get("method", {}).get("timer", "wall"),
                          form=table.meta.get("form", "eager"))["net"]


def profile_supernet(supernet: Supernet, input_hw: tuple[int, int]) -> dict[str, Any]:
    """The supernet's argmax architecture (``"argmax"``) and the whole supernet with every op
    and path computed, as in ``dense`` sampling (``"supernet"``)."""
    return {"argmax": profile_genotype(supernet.derive(), input_hw, supernet.num_joints,
                                       supernet.stem_blocks),
            "supernet": profile_network(supernet, input_hw)}


def draw_fabric(genotype: Genotype, path: str | Path) -> None:
    """Draw the fabric (thesis Fig. A.1) into a PNG: cells in a rows x layers grid with their
    number and ops, lines for the chosen inputs, dashed Fuse-Split lines at the EELs; pruned
    cells are grey outlines."""
    from PIL import Image, ImageDraw

    box_w, box_h, gap_x, gap_y, margin = 190, 78, 60, 34, 40
    cols = genotype.layers + 1
    width = margin * 2 + cols * box_w + cols * gap_x
    height = margin * 2 + 20 + genotype.rows * box_h + (genotype.rows - 1) * gap_y
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def box(layer: int, row: int) -> tuple[int, int, int, int]:
        x = margin + layer * (box_w + gap_x)
        y = margin + 20 + row * (box_h + gap_y)
        return x, y, x + box_w, y + box_h

    for layer in range(cols):
        x0, _, x1, _ = box(layer, 0)
        d.text(((x0 + x1) // 2 - 20, margin - 10), "stem" if layer == 0 else f"layer {layer}", fill="black")
    for layer in genotype.exit_layers:
        x = box(layer, 0)[2] + gap_x // 2
        for y in range(margin + 10, height - margin // 2, 12):
            d.line([(x, y), (x, y + 6)], fill="darkorange", width=2)
        d.text((x - 18, height - margin // 2 - 2), "exit" if layer == genotype.layers else "EEL",
               fill="darkorange")
    live = genotype.live_cells()
    for cell in genotype.cells:
        if cell.index not in live:
            continue
        x0, y0, _, _ = box(cell.layer, cell.row)
        for name in cell.inputs:
            src_layer, src_row = genotype.layout.source(genotype.layout.cells[cell.index], name)
            sx0, sy0, sx1, sy1 = box(src_layer, src_row)
            colour = {"above": "royalblue", "parallel": "black", "below": "seagreen"}[name]
            d.line([(sx1, (sy0 + sy1) // 2), (x0, y0 + box_h // 2)], fill=colour, width=3)
    x0, y0, x1, y1 = box(0, 0)
    d.rounded_rectangle((x0, y0, x1, y1), radius=8, outline="black", fill="lightgrey", width=2)
    d.text((x0 + 8, y0 + 8), "stem (1/4 scale)", fill="black")
    for cell in genotype.cells:
        x0, y0, x1, y1 = box(cell.layer, cell.row)
        if cell.index not in live:
            d.rounded_rectangle((x0, y0, x1, y1), radius=8, outline="lightgrey", width=1)
            d.text((x0 + 8, y0 + 8), f"{cell.index}  pruned", fill="grey")
            continue
        d.rounded_rectangle((x0, y0, x1, y1), radius=8, outline="black", fill="lightyellow", width=2)
        d.text((x0 + 8, y0 + 6), f"{cell.index}", fill="black")
        for e, ops in enumerate(cell.edges):
            d.text((x0 + 8, y0 + 22 + 16 * e), f"O{e}: " + "+".join(OP_LABELS[o] for o in ops), fill="black")
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
