"""Perplexity and mean NLL over held-out texts, token-weighted.

A text becomes `tokens(text) + [eos]` exactly as training tokenises a document (no BOS), so the
metric measures the distribution the model is trained on. A document longer than `seq_len` is
cut into windows that overlap by one token, `ids[k·(L−1) : k·(L−1)+L]`: every token but the
document's first is predicted exactly once, with at most `L−1` tokens of context, and the first
token has nothing to be predicted from.

    NLL = Σ_tokens −log p(x_t | window context) / #predicted tokens,   perplexity = exp(NLL)

Sums are taken in float64 on the host in a fixed order, so a second call with the same weights
gives the same number bit for bit. Windows are batched (right-padded, padding masked out of
attention and loss) to keep a GPU busy. Across ranks, each rank sums its share of the windows
(`sharing.Share`) and the evaluator adds the ranks' sums (`collective.summed`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..data.tokenization import encode_texts, eos_id
from .runtime import batch_rows, idle, logits_of, pad_right, vocab_size
from .sharing import ALONE, Share


@dataclass(frozen=True)
class NllResult:
    nll_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else math.nan


def windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Windows of at most seq_len tokens overlapping by one (see the module docstring)."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 to predict anything")
    stride = seq_len - 1
    return [list(ids[start:start + seq_len]) for start in range(0, max(1, len(ids) - 1), stride)
            if len(ids[start:start + seq_len]) >= 2]


def document_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 max_tokens: int | None = None, predict_first: bool = False) -> list[list[int]]:
    """Each text as training sees it, in order. With `max_tokens`, the budget is split evenly
    over the texts (each keeps its first ⌈max_tokens / n⌉ tokens), so a sample is represented
    by all its documents rather than by the first long one. With `predict_first`, an EOS
    (a document boundary, as in packed training) goes before each text, so its first token is
    predicted too: every byte of the text is scored, whatever the tokenizer makes of its start."""
    eos = eos_id(tokenizer)
    lead = [eos] if predict_first else []
    docs = [lead + body + [eos] for body in encode_texts(tokenizer, list(texts))]
    if max_tokens is not None and docs:
        share = max(2, -(-max_tokens // len(docs)))
        docs = [ids[:share] for ids in docs]
    return docs


def token_nll(model: torch.nn.Module, docs: Sequence[Sequence[int]], *, seq_len: int,
              device: torch.device, pad_id: int, max_batch: int | None = None,
              share: Share = ALONE) -> NllResult:
    """Summed NLL and predicted-token count over this rank's share of the windows (all of them
    by default); call inside `runtime.inference`."""
    rows = [w for ids in docs for w in windows(ids, seq_len)]
    per_batch = batch_rows(seq_len, vocab_size(model), max_batch)
    total, count = 0.0, 0
    for chunk in share.batches(rows, per_batch):
        if not chunk:
            idle(model, device, pad_id)
            continue
        ids, mask = pad_right(chunk, pad_id, device)
        logits = logits_of(model, ids, mask)[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none")
        total += float(losses.double().sum().item())
        count += int((targets != -100).sum().item())
    return NllResult(total, count)
