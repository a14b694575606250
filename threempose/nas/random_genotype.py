"""Random genotypes of a search space at a given cost (the random baseline of NAS evaluation).

A random genotype is what the fabric's own sampler derives from *random* architecture
parameters: alpha, beta, m_alpha and m_beta drawn from N(0, 1) (as the ``random`` search
strategy does), then :meth:`Supernet.derive` (argmax on m, top-(i+1) of alpha and beta,
pruned). So it lies in exactly the space a search explores: same fabric, exits, Fuse-Split,
ops and Dyn-EGS states.

:func:`sample_matched_genotypes` keeps drawing until it has ``k`` distinct genotypes whose
GFLOPs lie within a relative ``tolerance`` of a target (rejection sampling, at most
``max_draws`` draws), so the comparison with a searched genotype is at equal cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from threempose.config import ModelConfig
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype
from threempose.nas.supernet import Supernet
from threempose.util.errors import UserError


class MatchedSamplingError(UserError, ValueError):
    """Fewer than the requested random genotypes fell within the GFLOPs window."""


@dataclass(frozen=True)
class CostedGenotype:
    """A genotype with its derived network's cost at the search's input size."""

    genotype: Genotype
    gflops: float            # multiply-adds to the last exit, in 1e9
    params_m: float          # parameters to the last exit, in 1e6


def genotype_cost(genotype: Genotype, input_hw: tuple[int, int], num_joints: int,
                  stem_blocks: int) -> CostedGenotype:
    """GFLOPs and parameters (to the last exit) of ``genotype``'s derived network at ``input_hw``."""
    net = DerivedNet(genotype, num_joints, stem_blocks)
    last = genotype.layers
    return CostedGenotype(genotype, net.exit_gflops(input_hw)[last], net.exit_params()[last] / 1e6)


def random_genotype(supernet: Supernet, generator: torch.Generator) -> Genotype:
    """The genotype ``supernet`` derives with alpha, beta, m_alpha, m_beta drawn from N(0, 1)
    by ``generator`` (the supernet's architecture parameters are overwritten)."""
    with torch.no_grad():
        for p in supernet.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return supernet.derive()


def sample_matched_genotypes(model: ModelConfig, input_hw: tuple[int, int], target_gflops: float, k: int,
                             tolerance: float = 0.05, max_draws: int = 2000, seed: int = 0,
                             exclude: Optional[list[Genotype]] = None) -> list[CostedGenotype]:
    """``k`` distinct random genotypes of ``model``'s search space with GFLOPs (at ``input_hw``)
    within ``target_gflops * (1 +- tolerance)``, in the order drawn.

    Draws with a generator seeded ``seed`` (the same arguments give the same genotypes);
    genotypes equal to one in ``exclude`` (e.g. the searched one) or to an earlier pick are
    skipped. Raises :class:`MatchedSamplingError` naming the GFLOPs range the draws reached
    when ``max_draws`` draws do not yield ``k``.
    """
    if k < 1:
        raise MatchedSamplingError(f"the number of random genotypes must be >= 1, got {k}")
    if not 0 < tolerance < 1:
        raise MatchedSamplingError(f"the GFLOPs tolerance must be in (0, 1), got {tolerance}")
    supernet = Supernet(model)
    generator = torch.Generator().manual_seed(seed)
    low, high = target_gflops * (1 - tolerance), target_gflops * (1 + tolerance)
    seen = {g.to_json() for g in exclude or []}
    picked: list[CostedGenotype] = []
    reached = [float("inf"), float("-inf")]
    for _ in range(max_draws):
        genotype = random_genotype(supernet, generator)
        key = genotype.to_json()
        if key in seen:
            continue
        costed = genotype_cost(genotype, input_hw, model.num_joints, model.stem_blocks)
        reached = [min(reached[0], costed.gflops), max(reached[1], costed.gflops)]
        if low <= costed.gflops <= high:
            seen.add(key)
            picked.append(costed)
            if len(picked) == k:
                return picked
    raise MatchedSamplingError(
        f"only {len(picked)} of {k} random genotypes within {target_gflops:.4g} GFLOPs +-{tolerance:.0%} "
        f"([{low:.4g}, {high:.4g}]) in {max_draws} draws; the draws reached {reached[0]:.4g} to "
        f"{reached[1]:.4g} GFLOPs: ask for fewer, widen the tolerance or allow more draws")
