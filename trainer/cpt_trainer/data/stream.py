"""One source on one rank as an endless, resumable stream of tokens, read unit by unit.

The rank works through the positions `positions.py` gives it: position q is unit
`order(q // U)[q % U]`, the order being a permutation of the U units drawn from
(seed, source, epoch), so every rank computes it and nobody stores it. A unit is read as a
stream (`SourceReader.documents`), curated document by document (`Curator.curate`: filters,
decontamination and dedupe within the unit), then tokenised in chunks of many documents for
the speed of batched encoding. Memory is bounded: one open unit and one tokenised chunk per
source, whatever the size of the corpus.

The whole position is the rank's `SourceState` (queue of `[q, docs, offset]`, next, stride):
"the next token is token `offset` of document `docs` (counting kept documents) of the unit
at position q". A document split across windows is therefore the packer's carry-over, kept
as a position rather than as tokens: a resumed stream re-opens the unit, re-reads and
re-curates the `docs` documents before it (dedupe is per unit, so the same ones are kept),
tokenises the current one again and continues at the same token. The look-ahead is a cache,
never state.
"""
from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from .curation import Curator
from .positions import SourceState
from .report import CurationReport
from .sources import Document, SourceReader, Unit
from .tokenization import TokenizedDoc, tokenize_documents

CHUNK_CHARS = 1 << 20
"""Characters tokenised per batched call (bounded so look-ahead memory stays small)."""
CHUNK_DOCS = 512


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens of one document."""

    ids: np.ndarray
    prompt_tokens: int
    """Leading tokens of the piece that belong to the prompt."""
    starts_document: bool


class SourceStream:
    _docs: Iterator[TokenizedDoc] | None
    _doc: TokenizedDoc | None

    def __init__(self, reader: SourceReader, curator: Curator,
                 tokenizer: PreTrainedTokenizerBase, report: CurationReport, *, seed: int,
                 position: SourceState):
        if not reader.units:
            raise ValueError(f"source {reader.source.name!r} has no files")
        self.name, self.reader, self.curator = reader.source.name, reader, curator
        self.tokenizer, self.report = tokenizer, report
        self._key = (seed & 0xFFFFFFFF, zlib.crc32(self.name.encode()))
        self._orders: dict[int, np.ndarray] = {}
        self._empty: set[int] = set()
        """Units found to hold no kept document (all of them: the source is unusable)."""
        self.last_piece: tuple[int, int, int, int, int] | None = None
        """Provenance of the last piece: (position, document in unit, start, end, document
        length), so a window's tokens can be traced to their unit and document."""
        self.load_state_dict(position)

    @property
    def unit_count(self) -> int:
        return len(self.reader.units)

    def unit_index(self, q: int) -> int:
        """Which unit position q reads."""
        epoch, index = divmod(q, self.unit_count)
        if epoch not in self._orders:  # one epoch's order at a time, reused by its positions
            rng = np.random.default_rng([*self._key, epoch])
            self._orders = {epoch: rng.permutation(self.unit_count)}
        return int(self._orders[epoch][index])

    def take(self, limit: int) -> Piece:
        """Up to `limit` tokens of the current document; advances the position."""
        doc, head = self._current(), self.queue[0]
        start, end = head[2], min(len(doc.ids), head[2] + limit)
        piece = Piece(doc.ids[start:end], min(max(doc.prompt_len - start, 0), end - start),
                      start == 0)
        self.last_piece = (head[0], head[1], start, end, len(doc.ids))
        if end == len(doc.ids):
            head[1], head[2], self._doc = head[1] + 1, 0, None
        else:
            head[2] = end
        return piece

    def _current(self) -> TokenizedDoc:
        while self._doc is None:
            if not self.queue:
                self.queue.append([self.next, 0, 0])
                self.next += self.stride
            if self._docs is None:
                self._docs = self._unit_documents(*self.queue[0][:2])
            self._doc = next(self._docs, None)
            if self._doc is None:
                self._finish_unit()
        return self._doc

    def _finish_unit(self) -> None:
        q, docs, _ = self.queue.pop(0)
        self._docs = None
        if docs == 0:
            self._empty.add(self.unit_index(q))
            if len(self._empty) == self.unit_count:
                raise ValueError(f"source {self.name!r} has no documents after curation "
                                 "(see the curation report)")

    def _unit_documents(self, q: int, skip: int) -> Iterator[TokenizedDoc]:
        """The kept documents of position q's unit from the `skip`-th on, tokenised in chunks."""
        chunk: list[Document] = []
        chars = 0
        # The report counts the corpus once: what the first epoch's reading finds.
        report = self.report if q < self.unit_count else CurationReport()
        for doc in self._kept(self.reader.units[self.unit_index(q)], skip, report):
            chunk.append(doc)
            chars += len(doc.full_text)
            if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield from tokenize_documents(self.tokenizer, chunk)
                chunk, chars = [], 0
        if chunk:
            yield from tokenize_documents(self.tokenizer, chunk)

    def _kept(self, unit: Unit, skip: int, target: CurationReport) -> Iterator[Document]:
        """Curated documents of a unit, without the first `skip`. Skipped ones were counted in
        the report when first read, so their verdicts go to a scratch report."""
        scratch, kept = CurationReport(), 0
        self.reader.report = target  # where unreadable records of this unit are reported
        for doc, verdict in self.curator.curate(self.reader.documents(unit)):
            report = scratch if kept < skip else target
            report.read[self.name] = report.read.get(self.name, 0) + 1
            if verdict:
                report.drop(verdict[0], doc.origin, verdict[1])
                continue
            kept += 1
            if kept > skip:
                report.kept[self.name] = report.kept.get(self.name, 0) + 1
                yield doc

    def state_dict(self) -> dict[str, Any]:
        return {"queue": copy.deepcopy(self.queue), "next": self.next, "stride": self.stride,
                "units": self.unit_count}

    def load_state_dict(self, state: SourceState) -> None:
        units = state.get("units", self.unit_count)
        if units != self.unit_count:
            raise ValueError(f"source {self.name!r}: the state counts {units} units, the source "
                             f"now has {self.unit_count}")
        self.queue = [list(map(int, item)) for item in state["queue"]]
        self.next, self.stride = int(state["next"]), int(state["stride"])
        self._docs = None
        self._doc = None
