"""A copy of a network that keeps only the submodules one computation uses.

    keep = modules_used(net, lambda: net.segment(images))   # names of the modules that ran
    part = pruned_copy(net, keep)                           # shares their weights, drops the rest

An exit segment of a :class:`~threempose.nas.derived.DerivedNet` runs the stem or one EEL's
Split, a few layers of cells, and one exit's Fuse-Split and head; ``torch.export`` saves every
parameter of the module it exports, used or not, so a segment exported from the whole network
carries every other segment's weights too. Exporting :func:`pruned_copy` instead stores only the
segment's own.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn


def modules_used(net: nn.Module, run: Callable[[], Any]) -> set[str]:
    """The qualified names (as in ``net.named_modules()``; ``""`` for ``net``) of every module
    whose ``forward`` ran during ``run()``, and of all their ancestors."""
    names = {m: name for name, m in net.named_modules()}
    ran: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: ran.add(names[mod])) for m in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    keep = {""}
    for name in ran:
        parts = name.split(".") if name else []
        keep.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return keep


def pruned_copy(net: nn.Module, keep: set[str], prefix: str = "") -> nn.Module:
    """A structural copy of ``net`` holding only the submodules named in ``keep`` (qualified
    names, ancestors included, as :func:`modules_used` gives them): a dropped child of a
    ``ModuleDict`` is removed from it, any other dropped child becomes ``None`` (using it
    raises). Parameters and buffers of kept modules are shared with ``net``, not copied; ``net``
    is unchanged."""
    clone = copy.copy(net)
    clone._modules = {}
    for name, child in net._modules.items():
        full = prefix + name
        if child is not None and full in keep:
            clone._modules[name] = pruned_copy(child, keep, full + ".")
        elif not isinstance(net, nn.ModuleDict):
            clone._modules[name] = None
    clone._parameters = dict(net._parameters)
    clone._buffers = dict(net._buffers)
    return clone
