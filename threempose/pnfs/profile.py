"""Parameters and GFLOPs per person crop of a PNFS network (as PNFS Tables II-VII report them).

    python -m threempose.pnfs.profile --config configs/pnfs-coco.json            # the search space
    python -m threempose.pnfs.profile --config C.json --architecture A.json      # a searched architecture
    python -m threempose.pnfs.profile --checkpoint runs/.../model.pt --json      # a trained model
    python -m threempose.pnfs.profile --config C.json --input-size 192x256       # another crop (WxH)

GFLOPs are multiply-adds for one crop (:mod:`threempose.util.flops`: FlopCounterMode / 2), at the
config's crop size unless ``--input-size`` is given; the detector's cost is not included (as in
PNFS). The search space is measured as it runs in ``dense`` mode: every op and input of every
cell that reaches an output. Architecture parameters are not counted. ``python -m
threempose.profile --config C.json`` runs this when the config has ``pnfs.enabled``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from threempose.config import load_config
from threempose.pnfs.model import PnfsArchitecture, PnfsNet, load_pnfs_model, profile_pnfs
from threempose.util.cli import entry_point, parse_size


def format_profile(title: str, report: dict[str, Any]) -> str:
    """A profile as text: total, backbone and one line per part."""
    h, w = report["input_size"]
    lines = [f"{title} at {w}x{h} (WxH): {report['params_m']:.2f} M params, {report['gflops']:.2f} GFLOPs "
             "(multiply-adds per crop)",
             f"  {'component':<22} {'params (M)':>10} {'GFLOPs':>9} {'cells':>6}",
             f"  {'backbone':<22} {report['backbone']['params_m']:>10.4f} {report['backbone']['gflops']:>9.4f}"]
    for part in report["parts"]:
        lines.append(f"  {part['name']:<22} {part['params_m']:>10.4f} {part['gflops']:>9.4f} {part['cells']:>6}")
    return "\n".join(lines)


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m threempose.pnfs.profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a PNFS config (pnfs.enabled): profile its search space")
    what.add_argument("--checkpoint", help="a PNFS model.pt: profile the trained network")
    parser.add_argument("--architecture", help="with --config: profile this searched architecture instead")
    parser.add_argument("--input-size", type=parse_size, help="crop WxH (default: the config's pnfs.topdown)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.architecture and not args.config:
        parser.error("--architecture needs --config")
    if args.checkpoint:
        net, cfg = load_pnfs_model(args.checkpoint)
        title = args.checkpoint
    else:
        cfg = load_config(args.config, overrides={"pnfs": {"backbone_checkpoint": None}})
        architecture = PnfsArchitecture.load(args.architecture) if args.architecture else None
        net = PnfsNet(cfg, architecture)
        title = args.architecture or f"search space of {args.config}"
    hw = args.input_size or (cfg.pnfs.topdown.input_height, cfg.pnfs.topdown.input_width)
    report = profile_pnfs(net, hw)         # ValueError: e.g. a crop the HRNet backbone cannot take
    print(json.dumps({"source": title, **report}) if args.json else format_profile(title, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
