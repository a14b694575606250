"""Which samples an epoch sees, in which order: the epoch sampler (order fixed by seed and
epoch, resumable mid-epoch), the held-out split of the train set for the bilevel search, and
the once-per-epoch warning about images that failed to decode."""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields sample keys ``(index, epoch)`` in an order fixed by ``(seed, epoch)``.

    Args:
        indices: data set indices to draw from.
        seed: order seed.
        shuffle: permute each epoch (else keep ``indices`` order).
        rank, world_size: this process's share (every ``world_size``-th key from
            ``rank``, the list padded by wrapping so all ranks get the same count).
    """

    def __init__(self, indices: Sequence[int], seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.indices = list(indices)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use ``epoch``'s order, leaving out its first ``skip`` keys of this rank
        (to resume part-way through an epoch)."""
        self.epoch, self.skip = epoch, skip

    def _per_rank(self) -> int:
        return -(-len(self.indices) // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.indices
        if self.shuffle:
            order = [order[k] for k in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        if order:
            order = (order * self.world_size)[: self._per_rank() * self.world_size]
        mine = order[self.rank::self.world_size][self.skip:]
        return iter([(i, self.epoch) for i in mine])

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.skip)


def warn_skipped(skipped: list[str],
                 what: str = "image reads failed to decode and were replaced by other images") -> None:
    """One warning for a pass's images that failed to decode (``"<count> <what>: <names>"``)."""
    names = ", ".join(sorted(set(skipped)))
    warnings.warn(f"{len(skipped)} {what}: {names}", RuntimeWarning, stacklevel=3)


def held_out_split(n: int, fraction: float, seed: int, stream: int) -> tuple[list[int], list[int]]:
    """``(kept, held_out)``: sorted indices of ``range(n)`` with ``fraction`` of them (at least one)
    held out, in a split fixed by ``(seed, stream)`` (the architecture split of a bilevel search)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"arch_fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng([seed, stream]).permutation(n).tolist()
    cut = n - max(1, round(fraction * n))
    return sorted(perm[:cut]), sorted(perm[cut:])
