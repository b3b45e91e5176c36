"""The new tokens' embedding rows: mean-initialised from the pieces they replace.

Each new row of the input embedding is the mean of the OLD rows of the term's pieces (the split
the base tokenizer gave the running form); an untied output head gets the same for its rows
(and bias). A tied head stays tied: it is the same tensor. New ids follow the largest id in
use; a model with padded rows (more rows than ids) reuses its spare rows before growing. Text
without new terms keeps its ids and, right after this, its logits over the old vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from .tokenizer import NewToken


def _tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def mean_init(model: PreTrainedModel, tokens: Sequence[NewToken]) -> None:
    """Resize to hold the new ids and set each new row to the mean of its old piece rows."""
    if not tokens:
        return
    tied = _tied(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    old_out = head.weight.detach().clone() if head is not None and not tied else None
    old_bias = head.bias.detach().clone() if old_out is not None and head.bias is not None else None
    rows = max(t.id for t in tokens) + 1
    if rows > old_in.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    for t in tokens:
        pieces = torch.tensor(t.pieces, device=old_in.device)
        weight[t.id] = old_in[pieces].mean(0)
        if old_out is not None:
            head.weight[t.id] = old_out[pieces].mean(0)
            if old_bias is not None:
                head.bias[t.id] = old_bias[pieces].mean(0)
    if tied and not _tied(model):
        model.tie_weights()


__all__ = ["mean_init"]
