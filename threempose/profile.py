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

GFLOPs are multiply-adds (one per multiply-add, :mod:`threempose.util.flops`) for one image; an
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
from typing import Any, Optional, Sequence

from threempose.config import load_config
from threempose.measure.profile import draw_fabric, measure_latency, profile_genotype, profile_supernet
from threempose.nas.genotype import Genotype
from threempose.nas.latency_table import LatencyTable
from threempose.nas.supernet import Supernet
from threempose.pnfs.dispatch import pnfs_main
from threempose.util.cli import check_output_file, entry_point, parse_size

MODELS = ("higherhrnet-w32",)


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
    parser.add_argument("--input-size", type=parse_size, default=(512, 512),
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
