"""Measure a latency table (:mod:`threempose.nas.latency_table`) on this machine's device.

::

    python -m threempose.latency --device cpu --input-size 512 --out lut-cpu-512.json
    python -m threempose.latency --device cuda --input-size 512 --config configs/search.json --batch 1
    python -m threempose.latency --device cpu --input-size 512 --threads 2 --reps 30

The method (what is timed, forms, timers, calibration) is described in
:mod:`threempose.measure.latency`.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from threempose.config import ModelConfig, load_config
from threempose.inference.deploy import cpu_bf16_missing
from threempose.measure.latency import FORM, FORMS, PRECISIONS, TIMERS, build_table, check_precision, check_timer
from threempose.nas.latency_table import LatencyTableError
from threempose.util.cli import check_output_file, entry_point, parse_size
from threempose.util.threads import torch_threads


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m threempose.latency",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True, help="where to measure")
    parser.add_argument("--input-size", type=parse_size, required=True, help="N or WxH")
    parser.add_argument("--config", help="take the fabric from this config's model section "
                                         "(default: the thesis fabric)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds; the median is kept (default 15)")
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                        help="wall clock (default) or process CPU time (needs --threads 1; module docstring)")
    parser.add_argument("--form", choices=FORMS, default=FORM,
                        help="time blocks and networks deploy-optimized as inference runs them (default) "
                             "or eager (BatchNorm kept; inference_form)")
    parser.add_argument("--precision", choices=(*PRECISIONS, "int8"), default="fp32",
                        help="time the deploy form in fp32 (default) or bf16 (recorded in the table; the "
                             "search checks it against loss.cost.target_precision)")
    parser.add_argument("--out", help="output JSON (default latency-DEVICE-HxW.json)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.reps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--batch, --reps and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LatencyTableError("--device cuda but no CUDA device is available")
    check_precision(args.precision)
    if args.precision == "bf16" and args.device == "cpu" and cpu_bf16_missing() is not None:
        raise LatencyTableError(f"--precision bf16 cannot run on this machine: it needs {cpu_bf16_missing()}")
    model = load_config(args.config).model if args.config else ModelConfig()
    hw = args.input_size
    out = check_output_file(args.out or f"latency-{args.device}-{hw[0]}x{hw[1]}.json", "--out")
    start = time.perf_counter()
    with torch_threads(args.threads):
        check_timer(args.timer, args.device)
        table = build_table(model, hw, args.device, args.batch, args.warmup, args.reps, progress=True,
                            timer=args.timer, form=args.form, precision=args.precision)
    table.save(out)
    print(f"wrote {out}: {len(table.entries)} blocks on {table.device} ({table.device_name}), "
          f"{table.meta['threads']} threads, batch {args.batch}, {hw[1]}x{hw[0]} (WxH), form {args.form}, {args.precision}, calibration "
          f"x{table.calibration:.3f}, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
