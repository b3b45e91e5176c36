"""What a run trains on: the data sources, their mixture, curation and packing into sequences.

The mixture's cross-field rules (unique names, a domain source, schedules only under a
curriculum) live here as validators; `cel_rules.py` mirrors them for the CRD. Part of the CptRun
spec (`cpt_api.spec` assembles the sections).
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel
from .storage import URI_PATTERN


class SourceRole(str, Enum):
    domain = "domain"
    replay = "replay"
    instruction = "instruction"


class SourceFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"


class WeightPoint(SpecModel):
    tokens: int = Field(ge=0)
    """Position in the run, in training tokens."""
    weight: float = Field(ge=0)


GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
"""Gopher's English stop words (Rae et al. 2021): a document with fewer than two is rarely prose."""


class QualitySpec(SpecModel):
    """Heuristic quality rules run on each document as it is read: Gopher's quality rules (Rae
    et al. 2021) and, when `fineweb` is set, FineWeb's line rules (Penedo et al. 2024), both as
    datatrove implements them. The defaults are datatrove's, set for English web text: another
    language needs its own `stopWords`, and code fails the word rules (leave it unfiltered or
    turn rules off). A null threshold turns its rule off."""

    min_words: int | None = Field(default=50, ge=1)
    max_words: int | None = Field(default=100_000, ge=1)
    min_mean_word_length: float | None = Field(default=3, ge=0)
    max_mean_word_length: float | None = Field(default=10, ge=0)
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)
    """Largest count of '#' (or of ellipses) per word."""
    max_bullet_lines_ratio: float | None = Field(default=0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float | None = Field(default=0.3, ge=0, le=1)
    min_alpha_words_ratio: float | None = Field(default=0.8, ge=0, le=1)
    """Smallest share of words with at least one letter: random symbols fail it."""
    min_stop_words: int | None = Field(default=2, ge=1)
    """Fewest distinct stop words a document must contain."""
    stop_words: list[str] = Field(default_factory=lambda: list(GOPHER_STOP_WORDS), max_length=1000)
    fineweb: bool = False
    """Also FineWeb's rules: share of lines ending in punctuation, of short lines, of duplicated
    line characters, newlines per word (web pages; they drop most structured text)."""


class DataSource(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$", max_length=63)
    role: SourceRole
    uri: str = Field(min_length=1, max_length=4096, pattern=URI_PATTERN)
    """fsspec URL or glob (local path, s3://bucket/prefix/*.jsonl, ...)."""
    format: SourceFormat = SourceFormat.text
    field: str = "text"
    """JSONL field or Parquet column holding the document text."""
    weight: float = Field(default=1.0, gt=0)
    """Relative sampling weight (normalised over all sources)."""
    schedule: list[WeightPoint] | None = Field(default=None, max_length=64)
    """Curriculum: weight as a piecewise-linear function of training tokens."""
    quality: QualitySpec | None = None
    """This source's quality rules, in place of `curation.quality`."""

    @model_validator(mode="after")
    def _schedule_sorted(self) -> "DataSource":
        if self.schedule is not None:
            if len(self.schedule) < 2:
                raise ValueError("schedule needs at least two points")
            positions = [p.tokens for p in self.schedule]
            if positions != sorted(positions) or len(set(positions)) != len(positions):
                raise ValueError("schedule points must have strictly increasing tokens")
        return self


class MixtureStrategy(str, Enum):
    fixed = "fixed"
    curriculum = "curriculum"
    adaptive = "adaptive"


class CurationSpec(SpecModel):
    dedupe: Literal["none", "exact", "near"] = "exact"
    """Drop duplicate documents: exact (hash) or near (MinHash over word shingles)."""
    near_threshold: float = Field(default=0.85, gt=0, le=1)
    min_chars: int = Field(default=32, ge=0)
    max_chars: int = Field(default=2_000_000, ge=1)
    max_non_printable: float = Field(default=0.1, ge=0, le=1)
    """Largest share of non-printable characters a document may have."""
    max_repeated_line_ratio: float = Field(default=0.5, ge=0, le=1)
    """Largest share of duplicated lines (templated boilerplate) a document may have."""
    quality: QualitySpec | None = None
    """Quality rules for every source without its own (`sources[].quality`); none when unset."""
    max_dropped_share: float = Field(default=0.9, gt=0, le=1)
    """A source of which curation drops more than this share of the documents read (once 32 or
    more are read) refuses the run, naming the source and the filters: its data is broken, or a
    filter does not suit it."""
    decontaminate: bool = True
    """Drop training documents that share an n-gram with an evaluation set."""
    decontamination_ngram: int = Field(default=13, ge=4, le=64)


class DataSpec(SpecModel):
    sources: list[DataSource] = Field(min_length=1, max_length=64)
    strategy: MixtureStrategy = MixtureStrategy.fixed
    seed: int = 0
    adaptive_max_boost: float = Field(default=2.0, ge=1.0, le=10.0)
    """adaptive: a source's weight may grow to at most this multiple of its base weight."""
    curation: CurationSpec = Field(default_factory=CurationSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        if not any(s.role == SourceRole.domain for s in self.sources):
            raise ValueError("the mixture needs at least one source with role 'domain'")
        has_schedule = any(s.schedule for s in self.sources)
        if has_schedule and self.strategy != MixtureStrategy.curriculum:
            raise ValueError("a source has a schedule but strategy is not 'curriculum'")
        return self


class Boundary(str, Enum):
    eos = "eos"
    document_mask = "documentMask"


class PackingSpec(SpecModel):
    seq_len: int = Field(default=1024, ge=16, le=1_048_576)
    boundary: Boundary = Boundary.document_mask
    """eos: EOS between documents, attention may cross them. documentMask: position ids restart
    per document and attention is block-diagonal, so no document sees another."""
