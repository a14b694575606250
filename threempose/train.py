"""Train the network of a genotype (thesis §4.1 "Training").

    python -m threempose.train --config configs/train-small.json --genotype runs/.../genotype.json
    deepspeed threempose/train.py --config configs/train.json --genotype G.json
    python -m threempose.train --config ... --genotype G.json --resume runs/train-...

The derived network (only the genotype's ops and paths, its EELs and heads) is trained
with Adam (``train.lr``, decayed by ``train.lr_gamma`` at ``train.lr_milestones``), the
heatmap and grouping losses on every exit (``loss.heatmap_weight``,
``loss.grouping_weight``; the FLOPs and teacher terms belong to the search and are not
used here). The run directory gets the genotype, a checkpoint every epoch, metrics and
at the end ``model.pt`` (what ``threempose.infer`` loads) and ``profile.json``.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `deepspeed threempose/train.py`: import the installed package, not this folder's modules.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import sys
from pathlib import Path
from typing import Optional

from threempose.engine.launch import job_arguments, run_job
from threempose.nas.genotype import Genotype
from threempose.pnfs.dispatch import pnfs_main
from threempose.training.train_job import TrainJob
from threempose.util.cli import entry_point


@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    if (pnfs := pnfs_main("train", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    parser = job_arguments("threempose.train", __doc__.split("\n\n")[0])
    parser.add_argument("--genotype", required=True, help="genotype JSON (a search's genotype.json)")
    args = parser.parse_args(argv)
    genotype = Genotype.load(args.genotype)
    return run_job(args, "train", lambda cfg, ctx: TrainJob(cfg, ctx, genotype))


if __name__ == "__main__":
    sys.exit(main())
