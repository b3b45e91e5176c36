"""The new tokens' embedding rows: mean-initialised from the pieces they replace.

Each new row of the input embedding is the mean of the OLD rows of the term's pieces (the split
the base tokenizer gave the running form); an untied output head gets the same for its rows
(and bias). A tied head stays tied: it is the same tensor. New ids follow the largest id in
use; a model with padded rows (more rows than ids) reuses its spare rows before growing. Text
without new terms keeps its ids and, right after this, its logits over the old vocabulary.

Two steps, so that no rank ever holds a whole embedding: `grow` gives the model (a skeleton on
the meta device, or a loaded one) the rows, `fill_rows` computes them once the old rows are
loaded. Under FSDP2 a rank holds rows `[o, o+n)` of each tensor, so a new row's pieces may live
on other ranks: every rank sums the piece rows it holds, one all-reduce over the shard group adds
the partial sums, and the rank holding each new row writes it. Every rank runs the same
collectives whatever rows it holds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from transformers import PreTrainedModel

from ..load.fill import local_rows

if TYPE_CHECKING:
    from .tokenizer import NewToken

_TOKENS_PER_REDUCE = 1024  # bounds the partial sums to 1024 rows at a time


def _tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    return out is not None and out.weight is model.get_input_embeddings().weight


def grow(model: PreTrainedModel, tokens: Sequence[NewToken]) -> None:
    """Give the embedding (and head) rows for the new ids; their values come from `fill_rows`."""
    rows = max((t.id for t in tokens), default=-1) + 1
    if rows > cast(torch.Tensor, model.get_input_embeddings().weight).shape[0]:
        tied = _tied(model)
        model.resize_token_embeddings(rows, mean_resizing=False)
        if tied and not _tied(model):
            model.tie_weights()


def grown_names(model: PreTrainedModel) -> list[str]:
    """State-dict names of the tensors `grow` may have made longer than the base's."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False)
             if p is model.get_input_embeddings().weight]
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if head is not None:
        names += [n for n, p in model.named_parameters(remove_duplicate=False)
                  if p is head.weight or p is getattr(head, "bias", None)]
    return names


@torch.no_grad()
def fill_rows(model: PreTrainedModel, tokens: Sequence[NewToken]) -> None:
    """Set each new row to the mean of its old piece rows (a collective under sharding)."""
    tensors = [cast(torch.Tensor, model.get_input_embeddings().weight)]
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if head is not None and not _tied(model):
        tensors.append(head.weight)
        if getattr(head, "bias", None) is not None:
            tensors.append(head.bias)
    for tensor in tensors:
        for first in range(0, len(tokens), _TOKENS_PER_REDUCE):
            _mean_rows(tensor, tokens[first:first + _TOKENS_PER_REDUCE])


def _mean_rows(tensor: torch.Tensor, tokens: Sequence[NewToken]) -> None:
    local, first = local_rows(tensor)
    rows = local.view(local.shape[0], math.prod(local.shape[1:]))  # a bias: rows of one value
    held = range(first, first + rows.shape[0])
    groups = _shard_groups(tensor)
    # the partial sums travel where the process group works (a GPU under NCCL, even when the
    # rows themselves are offloaded to the host)
    device = _collective_device(rows.device) if groups else rows.device
    sums = torch.zeros(len(tokens), rows.shape[1], dtype=torch.float32, device=device)
    for i, t in enumerate(tokens):
        mine = [p - first for p in t.pieces if p in held]
        if mine:
            sums[i] = rows[mine].float().sum(0).to(device)
    for group in groups:
        dist.all_reduce(sums, group=group)
    for i, t in enumerate(tokens):
        if t.id in held:
            rows[t.id - first] = (sums[i] / len(t.pieces)).to(rows.device, rows.dtype)


def _collective_device(default: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def _shard_groups(tensor: torch.Tensor) -> list[dist.ProcessGroup]:
    """The process groups over which `tensor`'s rows are split (none for a whole tensor)."""
    if not isinstance(tensor, DTensor):
        return []
    return [tensor.device_mesh.get_group(dim) for dim, placement in enumerate(tensor.placements)
            if isinstance(placement, Shard)]


def mean_init(model: PreTrainedModel, tokens: Sequence[NewToken]) -> None:
    """Both steps on a whole model."""
    if tokens:
        grow(model, tokens)
        fill_rows(model, tokens)


__all__ = ["fill_rows", "grow", "grown_names", "mean_init"]
