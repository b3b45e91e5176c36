"""Where the ranks' shares of an evaluation meet, so that every rank holds the same results.

Every rank evaluates its share of each suite (`sharing.py`); the metrics feed gates and
checkpoints on every rank, so they are combined here, on every rank, to the same bits:

- Sums (summed NLL and its token count, summed KL and its position count) travel as Python
  floats (float64) and are added with `math.fsum`, the exactly rounded sum of the ranks'
  parts: it does not depend on the order the parts arrive in, so every rank gets the same
  value, and an N-rank result differs from the 1-rank one only by how the model's own batches
  round (a window's logits depend a little on what it is batched with), not by the addition.
- Per-sample results (generated outputs, verdicts, drift responses) are gathered and
  interleaved back into sample order.

Each function is a collective: every rank calls it, in the same order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from ..distributed import gather_objects
from .sharing import Share, interleave

T = TypeVar("T")


def sharded(model: torch.nn.Module) -> bool:
    """An FSDP2-sharded module: its forward all-gathers parameters, a collective."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def share_of(*models: torch.nn.Module) -> Share:
    """This process's share of a computation that runs `models`: in lock step when any of them
    is sharded over more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return Share()
    world = dist.get_world_size()
    return Share(dist.get_rank(), world, lockstep=world > 1 and any(sharded(m) for m in models))


def summed(values: Sequence[float]) -> list[float]:
    """Each of this rank's partial sums added over all ranks (the same values on every rank)."""
    parts = gather_objects([float(v) for v in values])
    return [math.fsum(column) for column in zip(*parts)]


def in_order(mine: list[T]) -> list[T]:
    """Every rank's rank-strided share of per-sample results, gathered in sample order."""
    return interleave(gather_objects(mine))


__all__ = ["in_order", "share_of", "sharded", "summed"]
