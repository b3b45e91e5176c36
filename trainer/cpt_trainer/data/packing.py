"""Packing documents into fixed windows, and the loss mask that goes with it.

A window of T = seqLen tokens is filled from one source's stream: `[D1 eos D2 eos D3...]`,
taking whole documents while they fit and splitting the last one; its remainder opens the
source's next window. Windows are never padded (streams are endless), so every token is data.

Boundaries (`packing.boundary`):
- `eos`: position ids run 0..T-1 over the whole window; attention may cross documents and
  only the EOS separates them.
- `documentMask`: position ids restart at 0 at every document start, and also at the start of
  a window that continues a split document: the continuation is a new segment and does not
  carry on its earlier positions (its context is in the previous window, which attention
  cannot see, so the positions restart with the context).

The model contract (`Batch.model_inputs`). The block-diagonal mask is not a tensor we build:
transformers 5.x derives it from the position ids (`masking_utils.find_packed_sequence_indices`
splits a row wherever the position does not grow by one) for the sdpa, eager and flex
backends. It does so only when the forward gets `attention_mask=None` *and no KV cache*.
Llama-style models create a `DynamicCache` whenever `use_cache` is on, which is the config
default even in train mode, and with a cache present the packed-sequence check is skipped:
every token then attends to every earlier token of the window, across documents, silently
(measured on transformers 5.23; the cross-document contamination test in
tests/unit/data/test_packing.py guards it). So the model must be called with exactly
`model(**batch.model_inputs())`: input ids, position ids and `use_cache=False`, no attention
mask. The flash-attention backends turn position-id restarts into varlen offsets only for a
batch of ONE row (`modeling_flash_attention_utils._is_packed_sequence`); for them use
`model_inputs(flatten=True)`, which lays the B windows end to end in one row (safe, because
every window starts a segment at position 0) and reshape the logits back to [B, T, V].
Flattening under sdpa / eager would build a (B·T)² mask, hence not the default.
`check_document_isolation(model, flatten=...)` runs the contamination check against a live
model in milliseconds, for a trainer to assert at start-up with its real attention backend.

Labels follow the Hugging Face convention (aligned with input_ids; the model shifts them).
A label is -100 where no loss is taken: the first token of every segment (predicting it would
use the previous document as context, so no loss ever crosses a boundary; this includes the
window's first token, which has no context at all) and instruction prompt tokens. The EOS that
closes a document is predicted from that document, so it counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from .stream import SourceStream

IGNORE = -100


@dataclass
class Batch:
    """A micro-batch of packed windows; every tensor is [B, T]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    """-100 where no loss: prompts, segment starts (never across a document boundary)."""
    position_ids: torch.Tensor
    source_ids: torch.Tensor
    """Index into DataPipeline.source_names per token (windows are never padded)."""
    num_tokens: int
    """Tokens that count in the loss (labels != -100)."""

    def model_inputs(self, *, flatten: bool = False) -> dict[str, Any]:
        """Keyword arguments for the model's forward (see the module docstring for why
        `use_cache=False` and no attention mask: that is what keeps documents apart).
        flatten: one [1, B*T] row, for flash-attention backends."""
        ids, positions = self.input_ids, self.position_ids
        if flatten:
            ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
        return {"input_ids": ids, "position_ids": positions, "use_cache": False}

    def rows(self, keep: torch.Tensor) -> Batch:
        """The windows where the [B] mask `keep` is true."""
        labels = self.labels[keep]
        return Batch(self.input_ids[keep], labels, self.position_ids[keep], self.source_ids[keep],
                     int((labels != IGNORE).sum()))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device),
                     self.position_ids.to(device), self.source_ids.to(device), self.num_tokens)


@dataclass
class Window:
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    source_ids: np.ndarray


def pack_window(stream: SourceStream, seq_len: int, document_mask: bool,
                source_index: int) -> Window:
    ids = np.empty(seq_len, dtype=np.int64)
    labels = np.empty(seq_len, dtype=np.int64)
    positions = np.empty(seq_len, dtype=np.int64)
    filled = 0
    while filled < seq_len:
        piece = stream.take(seq_len - filled)
        end = filled + len(piece.ids)
        ids[filled:end] = piece.ids
        labels[filled:end] = piece.ids
        labels[filled:filled + piece.prompt_tokens] = IGNORE
        if piece.starts_document or filled == 0:
            labels[filled] = IGNORE
        positions[filled:end] = np.arange(len(piece.ids))
        filled = end
    if not document_mask:
        positions = np.arange(seq_len, dtype=np.int64)
    return Window(ids, labels, positions, np.full(seq_len, source_index, dtype=np.int64))


def collate(windows: list[Window]) -> Batch:
    labels = torch.from_numpy(np.stack([w.labels for w in windows]))
    return Batch(
        input_ids=torch.from_numpy(np.stack([w.input_ids for w in windows])),
        labels=labels,
        position_ids=torch.from_numpy(np.stack([w.position_ids for w in windows])),
        source_ids=torch.from_numpy(np.stack([w.source_ids for w in windows])),
        num_tokens=int((labels != IGNORE).sum()),
    )


def check_document_isolation(model: PreTrainedModel, *, flatten: bool = False,
                             atol: float | None = None) -> None:
    """Raise if `model`, called as `Batch.model_inputs(flatten=flatten)` calls it, lets one
    packed document see another: the logits of a second segment must not depend on the first.

    Two rows per batch, as in training (some backends honour packing only for one row). The
    default tolerance allows kernel rounding (a shorter first segment changes the tiling), not
    leakage: leaked attention moves logits by whole units even in a random model."""
    param = next(model.parameters())
    if atol is None:
        atol = 1e-4 if param.dtype == torch.float32 else 5e-2
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    vocab = int(weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, vocab, (6,), generator=gen)
    logits = []
    for first_len in (5, 9):
        first = torch.randint(0, vocab, (first_len,), generator=gen)
        length = first_len + len(target)
        ids = torch.stack([torch.cat([first, target]),
                           torch.randint(0, vocab, (length,), generator=gen)])
        positions = torch.stack([torch.cat([torch.arange(first_len), torch.arange(len(target))]),
                                 torch.arange(length)])
        batch = Batch(ids, ids, positions, torch.zeros_like(ids), 0).to(param.device)
        with torch.no_grad():
            out = model(**batch.model_inputs(flatten=flatten)).logits
        logits.append(out.reshape(2, length, -1)[0, -len(target):].float())
    drift = float((logits[0] - logits[1]).abs().max())
    if drift > atol:
        raise RuntimeError(
            f"packed documents attend to each other (logits moved by {drift:.3g} when the "
            f"previous document changed): this model / transformers / attention backend does "
            f"not derive the block-diagonal mask from position ids with flatten={flatten}; "
            f"use boundary: eos or another attention implementation")
