"""The static network of one genotype (thesis §4.1 "Training": the derived architecture with
unnecessary operators and paths pruned).

Only the genotype's chosen paths and ops exist as modules; cells whose output reaches no
exit are not built. The EELs, their Fuse-Split blocks and every head are kept, so the network
supports static inference at any exit and dynamic inference (:meth:`DerivedNet.iter_exits`)::

    net = DerivedNet(Genotype.load("configs/genotypes/3m-pose-thesis.json"))
    exits = net(images)                     # [ExitOutput(layer=4, ...), (7), (10)]
    for out in net.iter_exits(images):      # stops computing when the loop breaks
        if confident(out.heatmaps):
            break
    net.exit_gflops((512, 512))             # {4: ..., 7: ..., 10: ...} multiply-add GFLOPs
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor

from threempose.nas.fabric import FabricNet
from threempose.nas.fuse_split import ExitOutput


class DerivedNet(FabricNet):
    """The network of ``genotype`` (its cells are summed, unweighted).

    Args:
        genotype: the architecture (pruned on construction).
        num_joints: ``J``, heatmaps and tags per exit.
        stem_blocks: bottleneck units in the HRNet stem (the supernet's ``model.stem_blocks``).
    """

    def iter_exits(self, x: Tensor) -> Iterator[ExitOutput]:
        """Yield each exit's :class:`ExitOutput` (``[B, J, ceil(H/4), ceil(W/4)]`` heatmaps and
        tags for ``x`` ``[B, 3, H, W]``) in layer order. Layers after an exit are computed only
        when the next output is requested, so a consumer that stops early spends exactly
        ``exit_gflops(...)[layer]``."""
        return self.run(x, self.genotype)

    def forward(self, x: Tensor) -> list[ExitOutput]:
        """Every exit's output for ``x`` ``[B, 3, H, W]``, in layer order."""
        return list(self.iter_exits(x))
