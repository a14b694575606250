"""Parameters and GFLOPs of a genotype, a supernet config or the teacher (thesis Tables 4.1, 4.3).

::

    python -m threempose.profile --genotype configs/genotypes/3m-pose-thesis.json --input-size 512
    python -m threempose.profile --genotype G.json --input-size 640x480 --json
    python -m threempose.profile --genotype G.json --table            # Table A.1 (markdown)
    python -m threempose.profile --genotype G.json --draw fabric.png  # Fig. A.1
    python -m threempose.profile --config configs/search.json         # argmax architecture + whole supernet
    python -m threempose.profile --model higherhrnet-w32 --input-size 512 --json
    python -m threempose.profile --genotype G.json --latency lut.json            # + predicted ms
    python -m threempose.profile --genotype G.json --latency lut.json --measure  # + measured ms

GFLOPs are multiply-adds (one per multiply-add, :mod:`threempose.flops`) for one image; an
exit's figure is static: everything computed up to that exit's head (Table 4.3's convention).
``--input-size`` is ``N`` (square) or ``WxH`` (width x height, like an image resolution).
``--latency`` adds each exit's latency predicted by a table from ``python -m threempose.latency``
(the network is built with the table's ``stem_blocks`` and ``num_joints``; the table must match
the genotype's fabric and the input size); ``--measure`` also times the network on this machine
(the table's device, threads, batch and timer; it must be the table's device) and prints
measured beside predicted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from threempose.cli import check_output_file, entry_point
from threempose.config import load_config
from threempose.nas.fabric import FabricNet, Supernet
from threempose.nas.genotype import OP_LABELS, Genotype
from threempose.nas.latency_table import LatencyTable, LatencyTableError
from threempose.pnfs.dispatch import pnfs_main

MODELS = ("higherhrnet-w32",)


def parse_input_size(text: str) -> tuple[int, int]:
    """``"512"`` -> ``(512, 512)``; ``"640x480"`` (width x height) -> ``(480, 640)`` as ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"input size must be N or WxH (e.g. 512 or 640x480), got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[1], values[0])


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
    from threempose.nas.derived import DerivedNet

    return profile_network(DerivedNet(genotype, num_joints, stem_blocks), input_hw, latency)


def measure_latency(genotype: Genotype, table: LatencyTable, reps: int = 30) -> dict[int, float]:
    """Measured ms to each exit of ``genotype``'s network on this machine, as ``table`` was
    measured (its device, which must be this machine's, threads, batch, timer, form, input size):
    ``{layer: ms}``."""
    from threempose.latency import network_ms, torch_threads
    from threempose.nas.derived import DerivedNet

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

    from threempose.atomic import atomic_open

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


def _print_report(title: str, report: dict[str, Any]) -> None:
    print(f"{title}: {report['params_m']:.2f} M params, {report['gflops']:.2f} GFLOPs (multiply-adds)")
    ms = "latency_ms" in report
    measured = "measured_ms" in report["exits"][0]
    print(f"  {'exit':>6} {'GFLOPs':>8} {'params (M)':>11}" + (f" {'predicted ms':>13}" if ms else "")
          + (f" {'measured ms':>12} {'error':>7}" if measured else ""))
    for e in report["exits"]:
        line = f"  {e['layer']:>6} {e['gflops']:>8.2f} {e['params_m']:>11.2f}"
        if ms:
            line += f" {e['latency_ms']:>13.2f}"
        if measured:
            line += f" {e['measured_ms']:>12.2f} {e['latency_ms'] / e['measured_ms'] - 1:>+7.1%}"
        print(line)


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    if (pnfs := pnfs_main("profile", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    parser = argparse.ArgumentParser(prog="python -m threempose.profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--genotype", help="a genotype JSON file (format 1)")
    what.add_argument("--config", help="a config file: profile its model section's supernet")
    what.add_argument("--model", choices=MODELS, help="a hand-made model")
    parser.add_argument("--input-size", type=parse_input_size, default=(512, 512),
                        help="N or WxH (default 512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--table", action="store_true", help="print the genotype as Table A.1 (markdown)")
    parser.add_argument("--draw", metavar="OUT.png", help="draw the fabric (Fig. A.1)")
    parser.add_argument("--latency", metavar="LUT.json", help="a latency table: add predicted ms per exit")
    parser.add_argument("--measure", action="store_true", help="with --latency: also time the network here")
    args = parser.parse_args(argv)
    hw = args.input_size
    if args.model and (args.table or args.draw):
        parser.error("--table and --draw need --genotype or --config")
    if (args.latency and not args.genotype) or (args.measure and not args.latency):
        parser.error("--latency needs --genotype; --measure needs --latency")
    if args.draw:
        check_output_file(args.draw, "--draw")
    if args.genotype:
        genotype = Genotype.load(args.genotype)
        table, joints, stem = None, 17, 4
        if args.latency:
            table = LatencyTable.load(args.latency)
            joints, stem = table.fabric["num_joints"], table.fabric["stem_blocks"]
            table.check_fabric(genotype, stem, joints)
            table.check_input_size(hw)
        report = {"genotype": args.genotype, "input_size": list(hw),
                  **profile_genotype(genotype, hw, joints, stem, table)}
        if args.measure:
            measured = measure_latency(genotype, table)
            for e in report["exits"]:
                e["measured_ms"] = measured[e["layer"]]
            report["measured_ms"] = measured[genotype.layers]
    elif args.config:
        model_cfg = load_config(args.config).model
        supernet = Supernet(model_cfg)
        genotype = supernet.derive()
        report = {"config": args.config, "input_size": list(hw), **profile_supernet(supernet, hw)}
    else:
        from threempose.models.higherhrnet import profile_higherhrnet

        genotype = None
        report = {"model": args.model, "input_size": list(hw), **profile_higherhrnet(hw)}
    if args.draw:
        draw_fabric(genotype, args.draw)
    if args.json:
        if args.table:
            report["table"] = genotype.to_markdown()
        print(json.dumps(report))
    else:
        size = f"{hw[1]}x{hw[0]} (WxH)"
        if args.genotype:
            _print_report(f"{args.genotype} at {size}", report)
            if table is not None:
                print(f"latency: {args.latency}, {table.device} ({table.device_name}), "
                      f"{table.meta.get('threads')} threads, batch {table.meta.get('batch')}, "
                      f"form {table.meta.get('form')}")
        elif args.config:
            _print_report(f"argmax architecture of {args.config} at {size}", report["argmax"])
            _print_report("whole supernet (every op and path)", report["supernet"])
        else:
            print(f"{args.model} at {size}: {report['params_m']:.2f} M params, "
                  f"{report['gflops']:.2f} GFLOPs (multiply-adds)")
    if args.table and not args.json:
        print(genotype.to_markdown(), end="")
    if args.draw:
        print(f"drew {args.draw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
