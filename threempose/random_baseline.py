"""Does the search beat chance? Searched vs random genotypes of the same cost, same training.

::

    python -m threempose.random_baseline --search-config configs/search-small.json \\
        --train-config configs/baseline-train-small.json --random 8 --seeds 2 --out runs/baseline
    python -m threempose.random_baseline --genotype G.json --train-config T.json --random 8 --seeds 2 --out DIR
    python -m threempose.random_baseline ... --out DIR --resume      # after a kill: finished trainings are kept

Runs the search of ``--search-config`` (or takes ``--genotype``), draws ``--random`` K
genotypes of the same search space with GFLOPs within +-5% of the searched one's, trains
each of the K + 1 with ``--train-config`` for ``--seeds`` N seeds (run seeds run.seed,
run.seed + 1, ...), scores val AP on the held-out val split and writes ``DIR/baseline.json``,
``DIR/baseline.md`` (table and summary: mean AP, random mean +- std, rank, bootstrap CI of
the difference) and ``DIR/baseline.png`` (AP vs GFLOPs). Every training has its own run
directory under ``DIR/runs``; see :mod:`threempose.training.random_baseline`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from threempose.config import load_config
from threempose.engine.distributed import DistContext, resolve_device
from threempose.training.random_baseline import BaselineSettings, RandomBaseline
from threempose.util.cli import entry_point
from threempose.util.threads import apply_threads


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m threempose.random_baseline",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--search-config", help="search config: the protocol runs this search first")
    source.add_argument("--genotype", help="the searched genotype (a search's genotype.json) instead of a search")
    parser.add_argument("--train-config", required=True, help="train config used for every genotype")
    parser.add_argument("--random", type=int, required=True, metavar="K", help="number of random genotypes")
    parser.add_argument("--seeds", type=int, required=True, metavar="N", help="training seeds per genotype")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--resume", action="store_true", help="continue the protocol in DIR")
    parser.add_argument("--tolerance", type=float, default=0.05, help="GFLOPs window, relative (default 0.05)")
    parser.add_argument("--max-draws", type=int, default=2000, help="bound of the rejection sampling")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random genotypes' draws")
    args = parser.parse_args(argv)
    settings = BaselineSettings(search_config=args.search_config, train_config=args.train_config,
                                random=args.random, seeds=args.seeds, genotype=args.genotype,
                                tolerance=args.tolerance, max_draws=args.max_draws, sample_seed=args.sample_seed)
    train = load_config(args.train_config)
    plan = apply_threads(train.run.threads, train.data.num_workers)
    print(f"[threempose] threads: {plan.describe()}", file=sys.stderr, flush=True)
    ctx = DistContext(device=resolve_device(train.run.device))
    report = RandomBaseline(args.out, settings, ctx).run(resume=args.resume)
    s = report["summary"]
    print(f"searched mean AP {s['searched_mean']:.4f}, random {s['random_mean']:.4f} +- {s['random_std']:.4f}, "
          f"rank {s['rank']} of {s['of']}, difference {s['difference']:+.4f} "
          f"({s['ci_level']:.0%} CI [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}])")
    print(f"report: {args.out}/baseline.json, baseline.md, baseline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
