"""Backend switch for :mod:`threempose.kernels`: Triton kernels or their PyTorch references.

Three backends:

* ``"auto"`` (default): the Triton kernel when every tensor of the call is on a CUDA device
  (and Triton is installed), the PyTorch reference otherwise (CPU tensors, no Triton). When
  CUDA tensors take the reference anyway (Triton missing, a dtype or size the kernel does not
  take), a :class:`RuntimeWarning` says why, once per kernel and reason (not per call).
* ``"triton"``: always the Triton kernel. For CPU tensors this only works in Triton's
  interpreter, i.e. when ``TRITON_INTERPRET=1`` was set *before* ``threempose.kernels`` was
  imported (Triton reads it when a kernel is decorated); otherwise the call raises a
  :class:`RuntimeError` that says so. Meant for tests and debugging.
* ``"reference"``: always the plain PyTorch reference (any device).

The backend is chosen, in increasing priority, by the environment variable
``THREEMPOSE_KERNELS`` (read when this module is imported), by :func:`set_backend` (the
config's ``run.kernels`` calls it) and, for a block of code, by the :func:`use_backend`
context manager. The setting is process-wide (not thread-local).

Triton below :data:`MIN_TRITON` (3.3) cannot run the kernels: they pass tuples of pointers,
which Triton compiles from 3.2 and interprets from 3.3. Importing this module with such a
Triton installed raises an :class:`ImportError` that says so.

Every Triton launch in this package goes through :func:`launch`, which counts launches per
kernel name in :data:`launch_counts` so that tests can check that the Triton code really ran
(and how many launches a call took).
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import warnings
from typing import Iterator, Optional

import torch

MIN_TRITON = (3, 3)
"""The oldest Triton the kernels run on (tuple-of-pointer arguments: 3.2 compiles them, 3.3
also interprets them); ``pyproject.toml`` requires the same."""


def _check_triton_version(version: str) -> None:
    """Raise :class:`ImportError` when Triton ``version`` (e.g. ``"3.1.0"``) is below :data:`MIN_TRITON`."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < MIN_TRITON:
        floor = ".".join(map(str, MIN_TRITON))
        raise ImportError(
            f"threempose.kernels needs Triton >= {floor} (its kernels take tuples of pointers, "
            f"which older Tritons cannot compile or interpret), but Triton {version} is installed; "
            f"upgrade it (pip install 'triton>={floor}', which comes with torch >= 2.7) or uninstall "
            f"it to run the PyTorch references only")


try:  # Triton is a Linux-only dependency; everything works without it on the reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    HAS_TRITON = False

    class _NoTritonLanguage:
        """Stand-in so kernel definitions (``x: tl.constexpr`` annotations) still import."""

        constexpr = None

    class _NoTriton:
        """``triton.jit`` stand-in: returns the function unchanged; it is never launched."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

    triton = _NoTriton()  # type: ignore[assignment]
    tl = _NoTritonLanguage()  # type: ignore[assignment]

if HAS_TRITON:
    _check_triton_version(getattr(triton, "__version__", "unknown"))

__all__ = [
    "BACKENDS", "TRITON_DTYPES", "ENV_VAR", "HAS_TRITON", "MIN_TRITON",
    "get_backend", "set_backend", "use_backend",
    "interpreting", "resolve", "unsupported_dtype", "fallback_warnings", "launch", "launch_counts", "triton", "tl",
]

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Activation dtypes the Triton kernels take; float64 uses the reference on every backend."""
ENV_VAR = "THREEMPOSE_KERNELS"


def _triton_interpret_flag() -> bool:
    """What ``@triton.jit`` sees right now: ``triton.knobs.runtime.interpret`` (Triton >= 3.4,
    which reads TRITON_INTERPRET unless set in code), else the variable as older Tritons read it."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether the kernels of this package were decorated for Triton's interpreter: Triton decides
# in its ``@triton.jit`` decorator (at import), and the kernel modules import this module first,
# so the flag at this import is the one their kernels were built with.
_INTERPRET = _triton_interpret_flag()


def _check(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"threempose.kernels: unknown backend {name!r} from {source}; "
                         f"choose one of {', '.join(BACKENDS)}")
    return name.strip().lower()


_backend = _check(os.environ.get(ENV_VAR, "auto"), f"the environment variable {ENV_VAR}")

fallback_warnings: set[tuple[str, str]] = set()
"""The ``(kernel, reason)`` pairs already warned about (tests reset it with ``.clear()``)."""

launch_counts: collections.Counter = collections.Counter()
"""Number of Triton launches per kernel name since import (tests reset it with ``.clear()``)."""


def get_backend() -> str:
    """The current backend name: ``"auto"``, ``"triton"`` or ``"reference"``."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for all later calls (``"auto"``, ``"triton"`` or ``"reference"``).

    Raises:
        ValueError: for any other name.
    """
    global _backend
    _backend = _check(name, "set_backend()")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: use backend ``name`` inside the ``with`` block, then restore."""
    global _backend
    previous = _backend
    _backend = _check(name, "use_backend()")
    try:
        yield _backend
    finally:
        _backend = previous


def interpreting() -> bool:
    """True when this package's Triton kernels run in Triton's CPU interpreter."""
    return _INTERPRET


def unsupported_dtype(*tensors: torch.Tensor) -> Optional[str]:
    """The ``unsupported`` reason of :func:`resolve` when a tensor's dtype is not in
    :data:`TRITON_DTYPES` (e.g. float64), else None."""
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in TRITON_DTYPES})
    return f"the kernel takes no {', '.join(bad)} inputs" if bad else None


def _on_cuda(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(t.is_cuda for t in tensors)


def _warn_fallback(op: str, reason: str) -> None:
    """Warn, once per ``(op, reason)``, that CUDA tensors of ``op`` take the PyTorch reference."""
    if (op, reason) in fallback_warnings:
        return
    fallback_warnings.add((op, reason))
    warnings.warn(f"threempose.kernels.{op}: CUDA tensors take the (slower) PyTorch reference "
                  f"because {reason}; this warning is shown once", RuntimeWarning, stacklevel=3)


def resolve(op: str, *tensors: torch.Tensor, unsupported: Optional[str] = None) -> str:
    """The implementation a call of ``op`` on ``tensors`` takes: ``"triton"`` or ``"reference"``.

    ``unsupported`` is the caller's reason why its Triton kernel cannot take these tensors
    (e.g. ``"the inputs are float64"``), or None: such a call takes the reference on every
    backend. Under ``"auto"``, CUDA tensors that take the reference (for ``unsupported`` or
    because Triton is missing) warn once per ``(op, reason)``.

    Raises:
        RuntimeError: when the backend is ``"triton"`` but Triton cannot run these tensors
            (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1`` at import).
    """
    on_cuda = _on_cuda(tensors)
    if _backend == "reference":
        return "reference"
    if _backend == "auto":
        if not on_cuda:
            return "reference"
        reason = unsupported if HAS_TRITON else "Triton is not installed"
        if reason is not None:
            _warn_fallback(op, reason)
            return "reference"
        return "triton"
    # forced "triton"
    if not HAS_TRITON:
        raise RuntimeError(f"threempose.kernels.{op}: backend 'triton' was requested but Triton "
                           f"is not installed; install triton (Linux) or use backend 'auto' or "
                           f"'reference' (set_backend / {ENV_VAR})")
    if not on_cuda and not _INTERPRET:
        raise RuntimeError(
            f"threempose.kernels.{op}: backend 'triton' got CPU tensors, which Triton can only "
            f"run in its interpreter: set TRITON_INTERPRET=1 in the environment before "
            f"threempose.kernels is imported, move the tensors to a CUDA device, or use backend "
            f"'auto' / 'reference' (set_backend / {ENV_VAR})")
    if unsupported is not None:
        if on_cuda:
            _warn_fallback(op, unsupported)
        return "reference"
    return "triton"


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """Launch Triton ``kernel`` on ``grid`` with ``args``, counting it in :data:`launch_counts`."""
    launch_counts[name] += 1
    kernel[grid](*args, **kwargs)
