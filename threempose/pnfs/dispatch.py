"""How the main entry points hand a PNFS run to :mod:`threempose.pnfs` ("a second mode of one stack").

``python -m threempose.search / train / profile --config C.json`` run PNFS mode when ``C.json``
has ``pnfs.enabled``; ``python -m threempose.infer --checkpoint M.pt`` when ``M.pt`` is a PNFS
model file. Each main starts with::

    from threempose.pnfs.dispatch import pnfs_main
    if (pnfs := pnfs_main("search", argv)) is not None:
        return pnfs()

:func:`pnfs_main` only peeks at ``--config`` / ``--checkpoint``; the PNFS command parses the
whole command line itself (its own options: ``train --architecture``, ``infer --annotations``).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

COMMANDS = ("search", "train", "infer", "profile")


def _peek(option: str, argv: Optional[Sequence[str]]) -> Optional[str]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(option)
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return getattr(known, option.lstrip("-").replace("-", "_"))


def pnfs_requested(command: str, argv: Optional[Sequence[str]] = None) -> bool:
    """Whether ``command``'s command line (``argv``, default ``sys.argv[1:]``) names a PNFS config
    (``--config`` with ``pnfs.enabled``) or, for ``infer``, a PNFS model file (``--checkpoint``).
    A missing or broken file is not PNFS: the main command then reports the error itself."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; PNFS mode has {list(COMMANDS)}")
    if command == "infer":
        path = _peek("--checkpoint", argv)
        if path is None or not Path(path).is_file():
            return False
        from threempose.pnfs.model import is_pnfs_model_file

        return is_pnfs_model_file(path)
    path = _peek("--config", argv)
    if path is None:
        return False
    from threempose.config import ConfigError, load_config

    try:
        return load_config(path).pnfs.enabled
    except ConfigError:
        return False


def pnfs_main(command: str, argv: Optional[Sequence[str]] = None) -> Optional[Callable[[], int]]:
    """``threempose.pnfs.<command>.main`` bound to ``argv`` when :func:`pnfs_requested`, else None."""
    if not pnfs_requested(command, argv):
        return None
    main = importlib.import_module(f"threempose.pnfs.{command}").main
    return lambda: main(None if argv is None else list(argv))
