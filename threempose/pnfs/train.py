"""Train a searched PNFS architecture (top-down part-specific CNFs).

    python -m threempose.pnfs.train --config configs/pnfs-small.json --architecture runs/.../architecture.json
    python -m threempose.pnfs.train --config ... --architecture A.json --init runs/.../model.pt
    deepspeed threempose/pnfs/train.py --config configs/pnfs-coco.json --architecture A.json

``--architecture`` is a search's ``architecture.json``; ``--init`` starts from a PNFS model
file of the same architecture (e.g. the search's ``model.pt``) instead of fresh weights.
Writes ``model.pt`` (what ``python -m threempose.pnfs.infer`` loads) and ``profile.json``
(:class:`threempose.pnfs.jobs.PnfsTrainJob`). ``python -m threempose.train`` runs this when
the config has ``pnfs.enabled``.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `deepspeed threempose/pnfs/train.py`: import the installed package, not this folder's modules.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

import sys
from typing import Optional

from threempose.engine.launch import job_arguments, run_job
from threempose.pnfs.jobs import PnfsTrainJob
from threempose.pnfs.model import PnfsArchitecture
from threempose.util.cli import entry_point


@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    parser = job_arguments("threempose.pnfs.train", __doc__.split("\n\n")[0])
    parser.add_argument("--architecture", required=True, help="a PNFS search's architecture.json")
    parser.add_argument("--init", help="a PNFS model.pt of that architecture to start from")
    args = parser.parse_args(argv)
    architecture = PnfsArchitecture.load(args.architecture)
    return run_job(args, "train", lambda cfg, ctx: PnfsTrainJob(cfg, ctx, architecture, args.init))


if __name__ == "__main__":
    sys.exit(main())
