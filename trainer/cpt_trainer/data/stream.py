"""One source as an endless, resumable stream of tokens.

Each epoch visits this rank's documents in a fresh order, a permutation drawn from
(seed, rank, source, epoch), so the order is reproducible without storing it. The whole
position is three integers: (epoch, doc, offset) = "the next token is token `offset` of the
`doc`-th document of epoch `epoch`'s order". A document split across windows is therefore the
packer's carry-over, kept as a position rather than as tokens: a resumed stream re-tokenises
that one document and continues at the same token. Tokenisation runs ahead in chunks of many
documents, for the speed of batched encoding; the look-ahead is a cache, never state.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from .sources import Document
from .tokenization import TokenizedDoc, tokenize_documents

CHUNK_CHARS = 1 << 20
"""Characters tokenised per batched call (bounded so look-ahead memory stays small)."""
CHUNK_DOCS = 512


class DocStore(Protocol):
    def __len__(self) -> int: ...

    def tokenized(self, indices: Sequence[int]) -> list[TokenizedDoc]: ...

    def chunk_end(self, order: np.ndarray, start: int) -> int:
        """End (exclusive) of the look-ahead chunk that starts at order[start]."""
        ...


class TextStore:
    """Documents kept as text, tokenised on demand."""

    def __init__(self, docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase):
        self.docs, self.tokenizer = list(docs), tokenizer

    def __len__(self) -> int:
        return len(self.docs)

    def tokenized(self, indices: Sequence[int]) -> list[TokenizedDoc]:
        return tokenize_documents(self.tokenizer, [self.docs[i] for i in indices])

    def chunk_end(self, order: np.ndarray, start: int) -> int:
        chars, end = 0, start
        while end < len(order) and end - start < CHUNK_DOCS and chars < CHUNK_CHARS:
            chars += len(self.docs[order[end]].full_text)
            end += 1
        return end


class TokenStore:
    """Documents already tokenised (the token cache): one flat id array plus offsets."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray):
        self.ids, self.offsets, self.prompt_lens = ids, offsets, prompt_lens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokenized(self, indices: Sequence[int]) -> list[TokenizedDoc]:
        return [TokenizedDoc(self.ids[self.offsets[i]:self.offsets[i + 1]],
                             int(self.prompt_lens[i])) for i in indices]

    def chunk_end(self, order: np.ndarray, start: int) -> int:
        return min(len(order), start + CHUNK_DOCS)


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens of one document."""

    ids: np.ndarray
    prompt_tokens: int
    """Leading tokens of the piece that belong to the prompt."""
    starts_document: bool


class SourceStream:
    def __init__(self, name: str, store: DocStore, *, seed: int, rank: int):
        if len(store) == 0:
            raise ValueError(f"source {name!r} has no documents on rank {rank} after curation "
                             "(see the curation report)")
        self.name, self.store = name, store
        self._key = (seed & 0xFFFFFFFF, rank, zlib.crc32(name.encode()))
        self.epoch = self.doc = self.offset = 0
        self._order = self._order_of(0)
        self._ahead: dict[int, TokenizedDoc] = {}

    def _order_of(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self._key, epoch]).permutation(len(self.store))

    def take(self, limit: int) -> Piece:
        """Up to `limit` tokens of the current document; advances the position."""
        doc = self._current()
        start, end = self.offset, min(len(doc.ids), self.offset + limit)
        piece = Piece(doc.ids[start:end], min(max(doc.prompt_len - start, 0), end - start),
                      start == 0)
        if end == len(doc.ids):
            self._next_document()
        else:
            self.offset = end
        return piece

    def _current(self) -> TokenizedDoc:
        if self.doc not in self._ahead:
            end = self.store.chunk_end(self._order, self.doc)
            chunk = self.store.tokenized(self._order[self.doc:end].tolist())
            self._ahead = dict(zip(range(self.doc, end), chunk))
        return self._ahead[self.doc]

    def _next_document(self) -> None:
        self._ahead.pop(self.doc, None)
        self.doc, self.offset = self.doc + 1, 0
        if self.doc == len(self._order):
            self.epoch, self.doc = self.epoch + 1, 0
            self._order, self._ahead = self._order_of(self.epoch), {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "doc": self.doc, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.doc = int(state["epoch"]), int(state["doc"])
        self.offset = int(state["offset"])
        self._order, self._ahead = self._order_of(self.epoch), {}
