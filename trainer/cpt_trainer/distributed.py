"""Process-group setup for torchrun (or a plain single process) and the few collectives the
loop needs. gloo on CPU, NCCL on GPU; without torchrun's environment nothing is initialised and
every collective is the identity, so the same loop runs under `python -m cpt_trainer`.
"""
from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout: timedelta = timedelta(minutes=30)
    """How long a collective may wait (`parallelism.collectiveTimeoutSeconds`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup(use_cuda: bool, timeout: timedelta = timedelta(minutes=30)) -> Dist:
    """Join the process group torchrun describes in the environment (if any). A collective that
    waits longer than `timeout` (a peer is gone, or took another code path) fails the attempt."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=device if use_cuda else None)
    return Dist(rank, world, local, device, timeout)


def teardown() -> None:
    """Leave the process group. Models wrapped for it (DDP, FSDP) hold the group too and may sit
    in reference cycles: they are collected first, so no group outlives the interpreter (gloo's
    worker threads then abort the process at exit). No barrier here: on a failure path the peers
    may be gone, and a barrier would wait out the collective timeout."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 only and its result handed to every rank: one reading of
    something every rank must agree on (a source listing, Parquet footers). An error there is
    raised on every rank (the same type and message), so no rank waits for a result that will
    not come and every rank's log says why."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    failure: BaseException | None = None
    outcome: tuple[bool, Any] = (True, None)
    if dist.get_rank() == 0:
        try:
            outcome = (True, compute())
        except Exception as exc:
            failure, outcome = exc, (False, _portable(exc))
    shared = cast(tuple[bool, Any], broadcast_object(outcome))
    if failure is not None:
        raise failure
    if not shared[0]:
        raise shared[1]
    return cast(T, shared[1])


def _portable(exc: BaseException) -> BaseException:
    """`exc` as another process can unpickle it, else a RuntimeError with its type and message."""
    try:
        return pickle.loads(pickle.dumps(exc))  # type: ignore[no-any-return]
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts  # type: ignore[return-value]


def gather_problems(problems: list[str]) -> list[str]:
    """Every rank's list of problems, merged (in rank order, without repeats), on every rank:
    one rank that cannot go on stops them all with its reason."""
    return list(dict.fromkeys(p for part in gather_objects(problems) for p in part))
