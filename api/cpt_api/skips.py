"""Stretches of data a run skips because training on them spiked (PaLM's recipe: restart
before the spike, skip the batches that caused it, and only then suspect the LR).

A window is measured on one source's own token count: the tokens of that source the run has
consumed (trained on or skipped), summed over ranks. That count is a function of the data
stream alone, so it names the same windows after a restore from any earlier checkpoint, or from
the base, as long as the data version is the same. Shared by the trainer (which records and
skips windows), the events and the control plane (which carries them into later attempts).
"""
from __future__ import annotations

from typing import Sequence

from pydantic import Field, TypeAdapter

from .base import SpecModel


class DataSkip(SpecModel):
    source: str
    """The source whose per-source loss spiked."""
    start: int = Field(ge=0)
    """The source's consumed tokens when the first anomalous step began."""
    end: int = Field(ge=0)
    """The source's consumed tokens when the trainer gave the window up (exclusive)."""
    attempt: int = Field(default=1, ge=1)
    """The attempt that found it."""
    step: int = Field(default=0, ge=0)
    """The first anomalous step of the window (the spike)."""

    def covers(self, source: str, consumed: int) -> bool:
        return source == self.source and self.start <= consumed < self.end


def merge_skips(old: Sequence[DataSkip], new: Sequence[DataSkip]) -> list[DataSkip]:
    """`old` plus the windows of `new` not already in it (same source and start: a window the
    trainer widened replaces its narrower self)."""
    merged = {(s.source, s.start): s for s in old}
    for skip in new:
        known = merged.get((skip.source, skip.start))
        if known is None or skip.end > known.end:
            merged[(skip.source, skip.start)] = skip
    return sorted(merged.values(), key=lambda s: (s.source, s.start))


SKIP_LIST = TypeAdapter(list[DataSkip])
"""The JSON form of an attempt's windows (`api.manifest.SKIPS`)."""
