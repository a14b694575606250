"""Latency lookup tables: milliseconds of every block of a fabric on one device (hardware-aware
search, as FBNet / ProxylessNAS do for classification).

A :class:`LatencyTable` is a :class:`~threempose.nas.cost.BlockCosts` in ms: the supernet's
:meth:`~threempose.nas.supernet.Supernet.cost_table` and a network's
:meth:`~threempose.nas.fabric.FabricNet.exit_costs` price blocks with it exactly as they do
with multiply-adds, so the predicted latency of a network is the sum of its blocks' medians
(plus the element-wise sums of its cells, see :mod:`threempose.nas.cost`).

Every entry is keyed by what fixes its run time: the block kind and op, its widths and its
feature size (e.g. ``op:conv:C64:64x64``); identical blocks (the same op in every cell of a
row) are one entry. The file (``format`` 1, JSON) is written by ``python -m
threempose.latency`` and records how and where it was measured::

    {"format": 1, "device": "cpu", "device_name": "...", "torch": "2.13.0", "threads": 2,
     "batch": 1, "input_size": [512, 512], "form": "deploy", "method": {...},
     "fabric": {"rows": 4, "layers": 10, "channels": 32, "hidden": 2, "eels": [4, 7],
                "fuse_split": true, "stem_blocks": 4, "num_joints": 17},
     "ops": ["identity", "conv", ...], "entries": {"op:conv:C32:128x128": 6.1, ...},
     "calibration": 1.04}

A prediction is ``calibration * sum of the blocks' entries``: ``calibration`` is measured
on whole reference networks when the table is built (:func:`threempose.measure.latency.build_table`).

A table only prices the fabric, ops and input size it was measured for: the checks
(:meth:`LatencyTable.check_fabric`, :meth:`~LatencyTable.check_input_size`,
:meth:`~LatencyTable.check_device`) raise :class:`LatencyTableError` naming the mismatch.
"""
from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from threempose.nas.cost import BlockCosts
from threempose.nas.fuse_split import Fuse, Head, Split
from threempose.nas.stem import Stem
from threempose.util.errors import UserError
from threempose.util.files import atomic_write_json, read_json_file

FORMAT = 1
FABRIC_KEYS = ("rows", "layers", "channels", "hidden", "eels", "fuse_split", "stem_blocks", "num_joints")
BUILD_HINT = "build one with `python -m threempose.latency --device DEVICE --input-size N --out FILE`"


class LatencyTableError(UserError, ValueError):
    """A latency table is missing, malformed, stale (another fabric or input size) or foreign
    (measured on another device)."""


def _hw(hw: Sequence[int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def op_key(name: str, channels: int, hw: tuple[int, int]) -> str:
    """Candidate op ``name`` on ``[B, channels, *hw]``."""
    return f"op:{name}:C{channels}:{_hw(hw)}"


def path_key(name: str, channels: int, hw: tuple[int, int]) -> str:
    """Input path ``name`` into a ``channels``-wide cell of size ``hw`` (its input is the
    neighbour row's: half/double the width, twice/half the size)."""
    return f"path:{name}:C{channels}:{_hw(hw)}"


def output_key(hidden: int, channels: int, hw: tuple[int, int]) -> str:
    """A cell's concat of ``hidden`` nodes and its 1x1 output conv-BN."""
    return f"output:H{hidden}:C{channels}:{_hw(hw)}"


def add_key(channels: int, hw: tuple[int, int]) -> str:
    """One element-wise sum of two ``[B, channels, *hw]`` tensors."""
    return f"add:C{channels}:{_hw(hw)}"


def block_key(module: nn.Module, hw: tuple[int, int]) -> str:
    """The stem (``hw``: the image), a Fuse, a Split or a head (``hw``: row 0's size)."""
    if isinstance(module, Stem):
        return f"stem:blocks{len(module.blocks)}:C{module.proj[0].out_channels}:{_hw(hw)}"
    if isinstance(module, Fuse):
        widths = "-".join(str(r[0].in_channels) for r in module.reduce)
        scales = "-".join(str(s) for s in module.scales)
        return f"fuse:in{widths}:s{scales}:C{module.merge[0].out_channels}:{_hw(hw)}"
    if isinstance(module, Split):
        rows = "-".join(str(r) for r in module.rows)
        return f"split:rows{rows}:C{module.proj[str(module.rows[0])][0].in_channels}:{_hw(hw)}"
    if isinstance(module, Head):
        return f"head:C{module.conv.in_channels}:J{module.num_joints}:{_hw(hw)}"
    raise TypeError(f"no latency key for a {type(module).__name__}")


def device_name(device: torch.device | str) -> str:
    """A device's model name: the GPU's name, or the CPU's from /proc/cpuinfo (else platform)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class LatencyTable(BlockCosts):
    """Median milliseconds of every block of one fabric, measured on one device (module docstring).

    Attributes:
        entries: ``{block key: ms}`` for one forward of ``batch`` images.
        fabric: the :data:`FABRIC_KEYS` of the fabric it was measured for.
        ops: the candidate ops measured.
        input_hw: ``(H, W)`` of the images.
        device: ``"cpu"`` or ``"cuda"``; device_name: its model.
        meta: the rest of the file (torch version, threads, batch, form, method).
        source: the file it was read from (for messages).
        calibration: measured network / sum of its blocks (a factor on every prediction).
    """

    entries: dict[str, float]
    fabric: dict[str, Any]
    ops: list[str]
    input_hw: tuple[int, int]
    device: str
    device_name: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<latency table>"
    calibration: float = 1.0

    unit = "ms"

    @property
    def per_unit(self) -> float:
        """Raw (summed entries) per predicted ms: ``1 / calibration``."""
        return 1.0 / self.calibration

    # ------------------------------------------------------------ BlockCosts
    def _get(self, key: str) -> float:
        try:
            return self.entries[key]
        except KeyError:
            raise LatencyTableError(f"{self.source}: no entry {key!r}: the table was measured for "
                                    f"another fabric; {BUILD_HINT}") from None

    def op(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> float:
        return self._get(op_key(name, channels, hw))

    def path(self, module: nn.Module, name: str, channels: int, hw: tuple[int, int]) -> float:
        return self._get(path_key(name, channels, hw))

    def output(self, module: nn.Module, hidden: int, channels: int, hw: tuple[int, int]) -> float:
        return self._get(output_key(hidden, channels, hw))

    def add(self, channels: int, hw: tuple[int, int]) -> float:
        return self._get(add_key(channels, hw))

    def block(self, module: nn.Module, hw: tuple[int, int]) -> float:
        return self._get(block_key(module, hw))

    # ------------------------------------------------------------------ checks
    def check_fabric(self, genotype: Any, stem_blocks: int, num_joints: int,
                     ops: Optional[Sequence[str]] = None) -> None:
        """Raise :class:`LatencyTableError` unless the table was measured for this fabric
        (``genotype``'s - or a ``ModelConfig``'s - rows, layers, channels, hidden, eels,
        fuse_split, and ``stem_blocks``, ``num_joints``) and holds every op of ``ops`` (default:
        the ops ``genotype`` uses)."""
        want = {"rows": genotype.rows, "layers": genotype.layers, "channels": genotype.channels,
                "hidden": genotype.hidden, "eels": list(genotype.eels), "fuse_split": genotype.fuse_split,
                "stem_blocks": stem_blocks, "num_joints": num_joints}
        diff = [f"{k} {self.fabric.get(k)!r} (needed {want[k]!r})" for k in FABRIC_KEYS
                if self.fabric.get(k) != want[k]]
        if diff:
            raise LatencyTableError(f"{self.source} is stale: it was measured for another fabric: "
                                    f"{', '.join(diff)}; {BUILD_HINT}")
        if ops is None:
            ops = {o for c in genotype.cells for edge in c.edges for o in edge}
        missing = sorted(set(ops) - set(self.ops))
        if missing:
            raise LatencyTableError(f"{self.source} is stale: it has no latency for ops {missing} "
                                    f"(it measured {self.ops}); {BUILD_HINT}")

    def check_input_size(self, input_hw: tuple[int, int]) -> None:
        """Raise :class:`LatencyTableError` unless the table was measured at ``input_hw``."""
        if tuple(input_hw) != tuple(self.input_hw):
            raise LatencyTableError(f"{self.source} is stale: it was measured at input size "
                                    f"{_hw(self.input_hw)} (HxW), not {_hw(input_hw)}; {BUILD_HINT}")

    def check_device(self, device: torch.device | str, target: Optional[str] = None) -> None:
        """Check the table describes the device a run uses.

        Args:
            device: where the run (search, or ``profile --measure``) computes.
            target: the device type the user says the table is for (``"cpu"``/``"cuda"``),
                e.g. a CPU table while searching on a GPU. None: the run's own device.

        Raises :class:`LatencyTableError` when the table was measured on another device type
        than ``target`` (or, without ``target``, another type or model than ``device``); only
        warns when the table matches ``target`` but ``target`` is not the run's device.
        """
        device = torch.device(device)
        here = f"{device.type} ({device_name(device)})"
        there = f"{self.device} ({self.device_name})"
        if target is not None:
            if target != self.device:
                raise LatencyTableError(f"{self.source} is foreign: measured on {there}, but the "
                                        f"config says the target device is {target!r}; {BUILD_HINT}")
            if target != device.type:
                warnings.warn(f"{self.source}: latencies are of {there}, not of this run's device "
                              f"{here} (as asked: target device {target!r})", stacklevel=2)
            return
        if (self.device, self.device_name) != (device.type, device_name(device)):
            raise LatencyTableError(f"{self.source} is foreign: measured on {there}, this run uses "
                                    f"{here}; {BUILD_HINT}, or name the table's device as the target "
                                    "(loss.cost.target_device) if that is what you want")

    # ---------------------------------------------------------------- file I/O
    @property
    def precision(self) -> str:
        """The precision its blocks were timed in (``"fp32"`` for tables that predate the field)."""
        return str(self.meta.get("precision", "fp32"))

    def check_precision(self, target: str = "fp32") -> None:
        """Raise LatencyTableError unless the table was measured in ``target``, the precision
        the searched network will be deployed in (``loss.cost.target_precision``)."""
        if self.precision != target:
            raise LatencyTableError(f"{self.source}: latency table measured in {self.precision}, but the target "
                                    f"precision is {target}; measure one with `python -m threempose.latency ... --precision {target}`")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "device": self.device, "device_name": self.device_name, **self.meta,
                "input_size": list(self.input_hw), "fabric": self.fabric, "ops": self.ops,
                "calibration": self.calibration, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """Read a table written by ``python -m threempose.latency``."""
        return cls.from_dict(read_json_file(path, LatencyTableError, "latency table", BUILD_HINT), str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<latency table>") -> "LatencyTable":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise LatencyTableError(f"{source}: not a latency table (format {FORMAT}); {BUILD_HINT}")
        required = ("device", "device_name", "input_size", "fabric", "ops", "entries", "calibration")
        missing = [k for k in required if k not in raw]
        if missing:
            raise LatencyTableError(f"{source}: a latency table needs keys {missing}")
        entries = raw["entries"]
        if not isinstance(entries, dict) or not all(isinstance(v, (int, float)) and v >= 0
                                                    for v in entries.values()):
            raise LatencyTableError(f"{source}: 'entries' must map block keys to ms >= 0")
        if not isinstance(raw["calibration"], (int, float)) or raw["calibration"] <= 0:
            raise LatencyTableError(f"{source}: 'calibration' must be a number > 0")
        meta = {k: v for k, v in raw.items() if k not in required and k != "format"}
        return cls(entries={k: float(v) for k, v in entries.items()}, fabric=dict(raw["fabric"]),
                   ops=list(raw["ops"]), input_hw=tuple(raw["input_size"]), device=raw["device"],
                   device_name=raw["device_name"], meta=meta, source=source,
                   calibration=float(raw["calibration"]))
