"""Which evaluation items a rank takes, and how many batches it runs for them.

Every rank reads the whole suite (the same samples in the same order, `data.py`) and takes a
rank-strided share of the items a metric is computed over (windows, prompts, drift rows):
rank r of W takes items r, r+W, r+2W, ... Shares differ by at most one item whatever mix of
long and short items a suite holds, and sample order comes back by interleaving the shares
(item i is the (i div W)-th item of rank i mod W's share).

Lock step. A forward of a sharded model is a collective: it all-gathers parameters, block by
block, on every rank. So where the model is sharded every rank must call it as many times as
every other rank, whatever its share holds: each runs as many batches as the largest share
needs and a rank with a smaller share runs padding batches, whose results it drops. The largest
share is rank 0's, ⌈n/W⌉ items, so that count, ⌈⌈n/W⌉ / per_batch⌉, is known to every rank
without asking. Replicas and a single process have no collective in their forward: they run
their own batches only.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Share:
    rank: int = 0
    world: int = 1
    lockstep: bool = False
    """Every rank runs as many batches as the largest share (the model's forward is a
    collective); see the module docstring."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside world size {self.world}")

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's items, in sample order."""
        return list(items[self.rank::self.world])

    def padding(self, n: int, per_batch: int) -> int:
        """Batches this rank runs beyond its own, for a suite of `n` items."""
        if not self.lockstep:
            return 0
        own = _ceil_div(len(range(self.rank, n, self.world)), per_batch)
        return _ceil_div(_ceil_div(n, self.world), per_batch) - own

    def batches(self, items: Sequence[T], per_batch: int) -> Iterator[list[T]]:
        """This rank's items in batches of at most `per_batch`, then one empty batch per
        padding batch (the caller runs a throw-away forward for each)."""
        mine = self.take(items)
        for start in range(0, len(mine), per_batch):
            yield mine[start:start + per_batch]
        for _ in range(self.padding(len(items), per_batch)):
            yield []


ALONE = Share()
"""One process evaluating everything."""


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Every rank's share (in rank order) back in sample order."""
    world = len(parts)
    n = sum(len(p) for p in parts)
    return [parts[i % world][i // world] for i in range(n)]


__all__ = ["ALONE", "Share", "interleave"]
