"""Fill a model's tensors from an HF safetensors `Index`, each rank only the rows it holds.

The model comes materialised but uninitialised (`model.skeleton` + `materialize`, after
`fully_shard` when sharded): every parameter is a DTensor whose local shard is rows `[o, o+n)`
of the whole tensor (FSDP2 shards dim 0), or a plain tensor holding all of it (one process,
ddp). Each distinct tensor is read once, under whichever of its names the file holds: a tied
head and embedding are one tensor with two names, and HF files keep only one of them.

A tensor may have more rows than the file (`grown`: the embedding and head of a run that
extends the tokenizer): the rows the file has are read, the new ones are left to the extension's
mean initialisation, which runs right after (`extension/rows.py`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from ..errors import Refused
from .safetensors import Index, Stored

log = logging.getLogger(__name__)


def distinct_tensors(model: torch.nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Every distinct tensor of the model's state dict with all the names it goes by."""
    found: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        found.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(found.values())


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows this rank holds, the index of the first) for a DTensor or a plain tensor."""
    if not isinstance(tensor, DTensor):
        return tensor.detach(), 0
    local = tensor.to_local().detach()
    chunks = tensor.__create_chunk_list__()  # type: ignore[no-untyped-call]  # unannotated in torch
    if not chunks or local.numel() == 0:
        return local, 0
    offsets = list(chunks[0].offsets)
    if any(offsets[1:]) or tuple(local.shape[1:]) != tuple(tensor.shape[1:]):
        raise Refused(f"cannot load a tensor sharded along dimension > 0 (local {tuple(local.shape)} "
                      f"at {offsets} of {tuple(tensor.shape)}): only row sharding (FSDP2) is supported")
    return local, offsets[0]


@torch.no_grad()
def fill(model: torch.nn.Module, index: Index, grown: Iterable[str] = ()) -> None:
    """Read each rank's rows of every parameter and persistent buffer from `index`."""
    may_grow, missing = set(grown), []
    for names, tensor in distinct_tensors(model):
        stored = next((index.tensors[n] for n in names if n in index.tensors), None)
        if stored is None:
            if isinstance(tensor, torch.nn.Parameter):
                missing.append(names[0])
            continue  # a buffer the architecture computes (the skeleton kept its value)
        _check_shape(names, tensor, stored, grow=bool(may_grow.intersection(names)))
        _fill_one(index, stored, tensor)
    if missing:
        raise Refused(f"the base has no weights for {len(missing)} parameters of the model "
                      f"(e.g. {', '.join(missing[:5])}): another architecture, or a checkpoint whose "
                      "names differ from the model's")


def _check_shape(names: list[str], tensor: torch.Tensor, stored: Stored, *, grow: bool) -> None:
    want, have = tuple(tensor.shape), stored.shape
    same_rows = want[:1] == have[:1] or (grow and want[:1] >= have[:1])
    if want[1:] != have[1:] or not same_rows:
        raise Refused(f"{names[0]} is {have} in the base but {want} in the model: the base's "
                      "config.json and its weights disagree")


def _fill_one(index: Index, stored: Stored, tensor: torch.Tensor) -> None:
    local, first = local_rows(tensor)
    if local.ndim == 0:  # a scalar: one "row"
        local = local.view(1)
    stop = min(first + local.shape[0], stored.shape[0] if stored.shape else 1)
    if stop > first:
        index.read_rows(stored, range(first, stop), local[:stop - first])


__all__ = ["distinct_tensors", "fill", "local_rows"]
