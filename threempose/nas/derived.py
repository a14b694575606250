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

The same run as explicit *exit segments* (stem -> exit 4, exit 4 -> exit 7, exit 7 -> exit 10),
each taking and returning the carried features (:class:`~threempose.nas.fabric.Carry`: the
EEL layer's rows and the Fuse-Split skip), so a caller can drop images between segments
(batched dynamic inference) or export each segment on its own (:mod:`threempose.export`)::

    out4, carry = net.segment(images)       # carry.feats {row: [B, C_r, h_r, w_r]}, carry.skip
    out7, carry = net.segment(carry.select(still_running))
    out10, none = net.segment(carry)
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch import Tensor

from threempose.nas.fabric import Carry, FabricNet
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

    def segment(self, start: Tensor | Carry) -> tuple[ExitOutput, Optional[Carry]]:
        """From images ``[B, 3, H, W]`` (stem) or an EEL's carry to the next exit:
        ``(exit output, carry)``, carry None at the last exit (:meth:`FabricNet.run_segment`)."""
        return self.run_segment(start, self.genotype)

    def forward(self, x: Tensor) -> list[ExitOutput]:
        """Every exit's output for ``x`` ``[B, 3, H, W]``, in layer order."""
        return list(self.iter_exits(x))
