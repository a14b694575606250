"""PNFS architecture search (top-down part-specific CNFs, PNFS §III-F).

    python -m threempose.pnfs.search --config configs/pnfs-small.json
    deepspeed threempose/pnfs/search.py --config configs/pnfs-coco.json
    python -m threempose.pnfs.search --config ... --resume runs/pnfs-small-20261123-101500

Writes ``architecture.json``, ``model.pt`` and ``profile.json`` into its run directory
(:class:`threempose.pnfs.jobs.PnfsSearchJob`; ``search.strategy`` picks synchronous, bilevel
or random). ``python -m threempose.search`` runs this when the config has ``pnfs.enabled``.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `deepspeed threempose/pnfs/search.py`: import the installed package, not this folder's modules.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

import sys
from typing import Optional

from threempose.engine.launch import job_arguments, run_job
from threempose.pnfs.jobs import PnfsSearchJob
from threempose.util.cli import entry_point


@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    args = job_arguments("threempose.pnfs.search", __doc__.split("\n\n")[0]).parse_args(argv)
    return run_job(args, "search", PnfsSearchJob)


if __name__ == "__main__":
    sys.exit(main())
