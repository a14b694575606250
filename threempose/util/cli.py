"""How every command-line entry point ends: a user's mistake is one line, a bug a traceback.

Each ``main`` of ``search``, ``train``, ``infer``, ``evaluate``, ``profile``, ``calibrate``,
``export``, ``data.synthetic`` and the ``pnfs`` commands is wrapped by :func:`entry_point`:

* an expected user error - a :class:`UserError` (bad config, genotype, checkpoint, data,
  run directory, annotation, image ...) or a missing / unwritable path (``FileNotFoundError``,
  ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``) -
  prints ``error: <message>`` on stderr and exits with :data:`EXIT_USER_ERROR` (2);
* ``--debug`` on the command line (removed before the command parses it) or
  ``THREEMPOSE_DEBUG=1`` lets the traceback through instead;
* a write the disk refuses (full, over quota, read-only, I/O error) is one line too:
  ``error: cannot write <path>: No space left on device`` (see :mod:`threempose.util.errors`);
* Ctrl-C (``KeyboardInterrupt``) prints ``interrupted`` - with ``: resume with --resume <run
  dir>`` when the command registered one (:func:`note_resumable`) - and exits with
  :data:`~threempose.util.errors.EXIT_INTERRUPTED` (130); every write is atomic, so the last
  checkpoint is whole;
* any other exception keeps its traceback (it is a bug to report).

A command that imports torch also gets its thread pool sized by
:mod:`threempose.util.threads` before it starts (``search`` and ``train`` size it again from
their config's ``run.threads``).

Under a distributed launcher every rank exits 2, only rank 0 prints, and the process group
is torn down first (without a barrier: the other ranks may be inside another collective).

:func:`check_output_file` and :func:`check_output_dir` let a command refuse an output path
it could not write before it starts any work; :func:`parse_size` reads ``--input-size`` and
:func:`parse_device` ``--device``.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from threempose.util.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, OutputPathError, user_error_message
from threempose.util.threads import apply_threads

DEBUG_ENV = "THREEMPOSE_DEBUG"
DEBUG_FLAG = "--debug"


def debug_requested() -> bool:
    """Whether ``THREEMPOSE_DEBUG`` asks for tracebacks of user errors (set and not 0/empty)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _tear_down_process_group() -> None:
    """Destroy the default process group if one was joined (no barrier)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


MainFn = Callable[[Optional[list[str]]], Optional[int]]

_resume_hint: Optional[str] = None      # the run directory of the command running now


def note_resumable(run_dir: str | os.PathLike) -> None:
    """Tell :func:`entry_point` that the running command writes the resumable run directory
    ``run_dir``: a Ctrl-C then says ``interrupted: resume with --resume <run_dir>``."""
    global _resume_hint
    _resume_hint = str(run_dir)


def interrupted_message() -> str:
    """The line printed on Ctrl-C."""
    return "interrupted" + (f": resume with --resume {_resume_hint}" if _resume_hint else "")


def entry_point(main: Optional[MainFn] = None, *, also: tuple[type[BaseException], ...] = ()):
    """Wrap a command's ``main(argv) -> exit status`` with the error path of the module docstring.

    ``@entry_point`` or ``@entry_point(also=(ValueError,))``: ``also`` adds exception types
    the command reports as user errors (its inputs' checks raise them)."""
    if main is None:
        return lambda fn: entry_point(fn, also=also)

    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        if DEBUG_FLAG in args:
            args = [a for a in args if a != DEBUG_FLAG]
            os.environ[DEBUG_ENV] = "1"        # nested commands (the PNFS mains) see it too
        torch = sys.modules.get("torch")      # a command that computes: size torch's thread pool
        threads = torch.get_num_threads() if torch is not None else None
        if torch is not None:
            apply_threads()
        global _resume_hint
        _resume_hint = None
        try:
            status = main(args)
        except KeyboardInterrupt:
            if debug_requested():
                raise
            _tear_down_process_group()
            if _rank() == 0:
                print(interrupted_message(), file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except BaseException as e:
            message = user_error_message(e, also)
            if message is None or debug_requested():
                raise
            _tear_down_process_group()
            if _rank() == 0:
                print(f"error: {message}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        finally:
            if threads is not None:            # called from Python: leave the caller's setting
                torch.set_num_threads(threads)
        return 0 if status is None else int(status)

    return wrapped


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can become a file: it is not a directory,
    and its nearest existing ancestor is a writable directory. ``option`` (e.g. ``"--out"``)
    names the argument in the message. Returns ``path`` as a :class:`Path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: permission denied")
    _check_parent(path, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` is (or can be made) a writable directory."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file, not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: permission denied")
        return path
    _check_parent(path, option)
    return path


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write into {parent} (permission denied)")


def parse_size(text: str) -> tuple[int, int]:
    """An image or crop size argument: ``"512"`` -> ``(512, 512)``; ``"640x480"`` (width x height)
    -> ``(480, 640)`` as ``(H, W)``. Anything else is an ``argparse.ArgumentTypeError``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"size must be N or WxH (e.g. 512 or 640x480), got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[1], values[0])


def parse_device(text: str) -> str:
    """A ``--device`` argument: ``cpu``, ``cuda`` or ``cuda:N`` naming a GPU this machine has.
    Anything else is an ``argparse.ArgumentTypeError`` (argparse prints it as one line)."""
    match = re.fullmatch(r"cpu|cuda(?::([0-9]+))?", text, re.ASCII)
    if match is None:
        raise argparse.ArgumentTypeError(f"choose cpu, cuda or cuda:N, not {text!r}")
    index = match.group(1)
    if text != "cpu":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here; use cpu")
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), "
                                             f"cuda:0 to cuda:{count - 1}")
    return text
