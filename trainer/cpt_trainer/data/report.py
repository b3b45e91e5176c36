"""What the data plane dropped and why: the curation report.

Every document or line the pipeline refuses is counted under a reason ("filter") and the first
few are kept as examples with source, file and line, so a person can open the file and look.
Nothing is dropped silently: the report is written to `<report_dir>/curation.json` and each
unreadable file is also logged.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Origin:
    """Where a document came from: enough to find it again by hand."""

    source: str
    file: str
    line: int
    """1-based line (text, JSONL) or row number (Parquet); 0 when it names the whole file or
    when the line number is unknown (a JSONL range that does not start the file)."""
    byte: int = -1
    """Byte offset of a JSONL line; -1 when not applicable."""

    @property
    def where(self) -> str:
        """`file:line`, or `file@byte` where only the offset is known."""
        if self.line == 0 and self.byte >= 0:
            return f"{self.file}@{self.byte}"
        return f"{self.file}:{self.line}"


@dataclass
class FilterTally:
    dropped: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class CurationReport:
    """Counts per filter plus up to MAX_EXAMPLES examples each."""

    def __init__(self) -> None:
        self.filters: dict[str, FilterTally] = {}
        self.read: dict[str, int] = {}
        self.kept: dict[str, int] = {}
        self.dropped_by: dict[str, dict[str, int]] = {}
        """Source -> filter -> documents dropped."""

    def drop(self, filter_name: str, origin: Origin, reason: str) -> None:
        tally = self.filters.setdefault(filter_name, FilterTally())
        tally.dropped += 1
        by = self.dropped_by.setdefault(origin.source, {})
        by[filter_name] = by.get(filter_name, 0) + 1
        if len(tally.examples) < MAX_EXAMPLES:
            example = {"source": origin.source, "file": origin.file, "line": origin.line,
                       "reason": reason}
            if origin.byte >= 0:
                example["byte"] = origin.byte
            tally.examples.append(example)

    def bad_input(self, origin: Origin, reason: str) -> None:
        """An unreadable file or record: counted, logged, skipped; the run goes on."""
        log.warning("skipping %s:%d (source %s): %s",
                    origin.file, origin.line, origin.source, reason)
        self.drop("bad_input", origin, reason)

    def tally(self) -> tuple[int, int]:
        """(documents read, dropped): changes whenever the report does."""
        return sum(self.read.values()), sum(t.dropped for t in self.filters.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "filters": {name: {"dropped": t.dropped, "examples": list(t.examples)}
                        for name, t in sorted(self.filters.items())},
            "read": dict(self.read),
            "kept": dict(self.kept),
            "droppedBySource": {source: dict(sorted(by.items())) for source, by in sorted(self.dropped_by.items())},
        }

    def write(self, path: str) -> None:
        from .sources import open_fs  # sources imports this module

        fs, local = open_fs(path)
        parent = posixpath.dirname(local)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(local, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
