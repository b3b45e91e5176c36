"""Streaming curation: the checks that keep dirty documents out of training batches.

Filters run in this order, cheapest first, and a document stops at the first that drops it:
`too_short` / `too_long` (characters), `non_printable` (share of characters that are neither
printable nor whitespace), `repeated_lines` (share of non-blank lines that repeat an earlier
line: templated boilerplate), the source's quality rules (datatrove's Gopher and FineWeb rules,
see `quality.py`, reported under datatrove's rule names), `contamination` (shares an n-gram with an evaluation set),
`exact_duplicate` (same text as a kept document, by sha256) and `near_duplicate` (MinHash, see
`minhash.py`). Every drop is counted in the report with an example (source, file, line,
reason).

Curation runs on the rank's stream, one document at a time, as the documents are read. The
filters and decontamination look at one document. Deduplication looks back, and its scope is
one unit (a text file, a JSONL byte range, a Parquet row group, see sources.py): `curate` is
called once per unit with fresh memory. That scope is what keeps resume exact on any world
size: whether a document is kept depends on its unit alone, never on which rank read which
units before it, so a resumed or resharded rank that re-reads the start of a unit keeps the
same documents. Memory is bounded by one unit: exact dedupe keeps an 8-byte hash plus the
first copy's origin per kept document (~150 bytes; a 64 MiB range of 1 KiB records holds 64 Ki
documents, ~10 MiB), near dedupe a 128-permutation MinHash signature more (~1 KiB each).
Duplicates in different units are not found here: corpus-wide dedupe (exact or near) belongs
in data preparation, before a run, at the 100B-token scale this pipeline is built for.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence

from cpt_api.spec import CurationSpec, DataSpec, QualitySpec

from .decontamination import Decontaminator
from .minhash import NearDuplicateIndex
from .quality import check as quality_check
from .report import Origin
from .sources import Document

_WHITESPACE = set("\n\r\t\f\v")
_DROP_WHITESPACE = str.maketrans("", "", "\n\r\t\f\v")


def non_printable_share(text: str) -> float:
    # Nearly every document is clean: one C-level isprintable() pass decides that, and only
    # the rest pay for the per-character count (a Python loop, 25% of pipeline time otherwise).
    if text.translate(_DROP_WHITESPACE).isprintable():
        return 0.0
    bad = sum(1 for c in text if not c.isprintable() and c not in _WHITESPACE)
    return bad / max(len(text), 1)


def repeated_line_share(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def eval_digest(eval_texts: Sequence[str]) -> str:
    """Identity of the eval texts (decontamination makes the kept documents depend on them)."""
    digest = hashlib.sha256()
    for text in eval_texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def source_quality(data: DataSpec) -> dict[str, QualitySpec]:
    """Each source's quality rules: its own, else the curation-wide ones; absent: none."""
    rules = {s.name: s.quality or data.curation.quality for s in data.sources}
    return {name: spec for name, spec in rules.items() if spec is not None}


def curation_key(data: DataSpec, eval_texts: Sequence[str]) -> str:
    """Everything curation depends on besides the documents themselves."""
    spec = data.curation
    parts = {"spec": spec.dump(), "eval": eval_digest(eval_texts) if spec.decontaminate else "",
             "quality": {name: q.dump() for name, q in sorted(source_quality(data).items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


Verdict = tuple[str, str] | None
Check = Callable[[Document], Verdict]


class Curator:
    """Applies the curation spec to one source's documents at a time."""

    def __init__(self, spec: CurationSpec, eval_texts: Sequence[str],
                 quality: dict[str, QualitySpec] | None = None):
        self.spec = spec
        self.decontaminator = Decontaminator(eval_texts, spec.decontamination_ngram) \
            if spec.decontaminate else None
        self._quality = {name: quality_check(q) for name, q in (quality or {}).items()}

    def curate(self, docs: Iterable[Document]) -> Iterator[tuple[Document, Verdict]]:
        """Each document with its verdict: None to keep it, else (filter, reason). One call
        is one dedupe scope (a unit)."""
        seen: dict[int, Origin] = {}
        near = NearDuplicateIndex(self.spec.near_threshold) if self.spec.dedupe == "near" else None
        checks = self._checks()
        for doc in docs:
            verdict = next((v for v in (check(doc) for check in checks) if v), None)
            yield doc, verdict or self._duplicate(doc, seen, near)

    def _checks(self) -> list[Check]:
        checks: list[Check] = [self._length, self._contamination]
        # A share is at most 1 (and a repeated-line share below 1): a limit of 1 cannot fire.
        if self.spec.max_non_printable < 1.0:
            checks.insert(1, self._charset)
        if self.spec.max_repeated_line_ratio < 1.0:
            checks.insert(-1, self._template)
        if self._quality:
            checks.insert(-1, self._quality_rules)
        return checks

    def _quality_rules(self, doc: Document) -> tuple[str, str] | None:
        rules = self._quality.get(doc.origin.source)
        return rules(doc.full_text) if rules else None

    def _length(self, doc: Document) -> tuple[str, str] | None:
        n = len(doc.full_text)
        if n < self.spec.min_chars:
            return "too_short", f"{n} chars < minChars {self.spec.min_chars}"
        if n > self.spec.max_chars:
            return "too_long", f"{n} chars > maxChars {self.spec.max_chars}"
        return None

    def _charset(self, doc: Document) -> tuple[str, str] | None:
        share = non_printable_share(doc.full_text)
        if share > self.spec.max_non_printable:
            return "non_printable", f"{share:.1%} non-printable > {self.spec.max_non_printable:.1%}"
        return None

    def _template(self, doc: Document) -> tuple[str, str] | None:
        share = repeated_line_share(doc.full_text)
        if share > self.spec.max_repeated_line_ratio:
            limit = self.spec.max_repeated_line_ratio
            return "repeated_lines", f"{share:.0%} of lines repeat > {limit:.0%}"
        return None

    def _contamination(self, doc: Document) -> tuple[str, str] | None:
        if not self.decontaminator:
            return None
        gram = self.decontaminator.shared_ngram(doc.full_text)
        return ("contamination", f"shares eval {self.spec.decontamination_ngram}-gram "
                                 f"{gram!r}") if gram else None

    def _duplicate(self, doc: Document, seen: dict[int, Origin],
                   near: NearDuplicateIndex | None) -> tuple[str, str] | None:
        if self.spec.dedupe == "none":
            return None
        key = text_hash(doc.full_text)
        if key in seen:
            return "exact_duplicate", f"same text as {seen[key].where}"
        match = near.match(str(key), doc.full_text) if near else None
        if match:
            first = seen[int(match[0])]
            return "near_duplicate", f"Jaccard ~{match[1]:.2f} with {first.where}"
        seen[key] = doc.origin
        return None


JUDGED_AFTER = 32
"""Documents of a source read (over all ranks) before its dropped share is judged: a few bad
documents at the start of a file must not refuse a run."""


def dropped_shares(read: dict[str, float], kept: dict[str, float]) -> dict[str, float]:
    """Source -> share of the documents read that curation dropped (sources read from only)."""
    return {name: 1.0 - kept.get(name, 0) / n for name, n in read.items() if n > 0}


def starved_sources(read: dict[str, float], kept: dict[str, float], limit: float) -> dict[str, float]:
    """Source -> dropped share, for each source of which curation dropped more than `limit` of
    the documents read, once JUDGED_AFTER or more were read."""
    return {name: share for name, share in dropped_shares(read, kept).items()
            if read[name] >= JUDGED_AFTER and share > limit}


def starvation(read: dict[str, float], kept: dict[str, float], limit: float,
               dropped_by: dict[str, dict[str, int]]) -> str:
    """Why the run is refused when curation drops nearly all of some sources (`starved_sources`):
    their data is broken or a filter does not suit them, and the mixture would silently train on
    the other sources instead. `dropped_by` (source -> rule -> count, one rank's) names the rules."""
    parts = []
    for name, share in sorted(starved_sources(read, kept, limit).items()):
        rules = sorted(dropped_by.get(name, {}).items(), key=lambda kv: -kv[1])
        named = ", ".join(f"{rule} {n}" for rule, n in rules[:3]) or "no rule on this rank"
        parts.append(f"source {name!r}: curation dropped {share:.0%} of {read[name]:.0f} documents "
                     f"read (most by: {named})")
    return ("; ".join(parts) + f": above curation.maxDroppedShare {limit:.0%}. Fix the data or set the "
            "source's own quality rules (sources[].quality), see the curation report")


def text_hash(text: str) -> int:
    """8 bytes of blake2b: collisions among a unit's documents are out of reach (2^-64 each)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
