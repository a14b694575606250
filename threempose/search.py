"""Architecture search (thesis §3.2-3.4, §4.1 "Searching"; PNFS §III-F).

    python threempose/search.py --config configs/search-small.json
    deepspeed threempose/search.py --config configs/search.json        # all local GPUs
    deepspeed --hostfile hosts threempose/search.py --config ...       # many machines
    python threempose/search.py --config ... --resume runs/search-small-20261123-101500

Strategies (``search.strategy``):

* ``bilevel`` - first-order bilevel: each step updates alpha/beta/m on a batch of the
  held-out part of the train split (``search.arch_val_fraction``), then the weights on a
  train batch; two Adam optimizers (weights: ``search.weight_lr`` constant; arch:
  ``search.arch_lr`` decayed by ``arch_lr_gamma`` at ``arch_lr_milestones``).
* ``synchronous`` - one Adam over weights and arch parameters (PNFS).
* ``random`` - the architecture is drawn once at random and fixed; only weights train
  (PNFS' random-sampling baseline).

Every rank draws the same Gumbel sample (the seed is a function of run seed and step) and
architecture gradients are averaged over ranks, so the architecture parameters are
identical on every rank at every step; after every epoch a collective check raises
:class:`~threempose.training.search_optim.ArchDivergenceError` if any rank's alpha/beta/m differ from rank 0's, and at the end
every rank writes its own ``arch/final_rank<R>.pt``. Under the DeepSpeed launcher the weights
are stepped by a DeepSpeed engine (ZeRO stage etc. from the config's ``deepspeed`` section).
The run ends with ``genotype.json`` and ``profile.json`` in the run directory.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `python threempose/search.py`: drop this folder from sys.path (its modules would shadow
    # the standard library's, e.g. `profile`) and import the installed package instead.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import sys
from pathlib import Path
from typing import Optional

from threempose.engine.launch import job_arguments, run_job
from threempose.pnfs.dispatch import pnfs_main
from threempose.training.search_job import SearchJob
from threempose.util.cli import entry_point


# --------------------------------------------------------------------------- #
@entry_point
def main(argv: Optional[list[str]] = None) -> int:
    if (pnfs := pnfs_main("search", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    args = job_arguments("threempose.search", __doc__.split("\n\n")[0]).parse_args(argv)
    return run_job(args, "search", SearchJob)


if __name__ == "__main__":
    sys.exit(main())
