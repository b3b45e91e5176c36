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
    """1-based line (text, JSONL) or row number (Parquet); 0 when it names the whole file."""


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

    def drop(self, filter_name: str, origin: Origin, reason: str) -> None:
        tally = self.filters.setdefault(filter_name, FilterTally())
        tally.dropped += 1
        if len(tally.examples) < MAX_EXAMPLES:
            tally.examples.append({"source": origin.source, "file": origin.file,
                                   "line": origin.line, "reason": reason})

    def bad_input(self, origin: Origin, reason: str) -> None:
        """An unreadable file or record: counted, logged, skipped; the run goes on."""
        log.warning("skipping %s:%d (source %s): %s",
                    origin.file, origin.line, origin.source, reason)
        self.drop("bad_input", origin, reason)

    def merge(self, other: dict[str, Any]) -> None:
        """Fold in a stored report (from the token cache) for the sources it covers."""
        for name, tally in other.get("filters", {}).items():
            mine = self.filters.setdefault(name, FilterTally())
            mine.dropped += tally["dropped"]
            room = MAX_EXAMPLES - len(mine.examples)
            mine.examples.extend(tally["examples"][:max(room, 0)])
        self.read.update(other.get("read", {}))
        self.kept.update(other.get("kept", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "filters": {name: {"dropped": t.dropped, "examples": list(t.examples)}
                        for name, t in sorted(self.filters.items())},
            "read": dict(self.read),
            "kept": dict(self.kept),
        }

    def write(self, path: str) -> None:
        from .sources import open_fs  # sources imports this module

        fs, local = open_fs(path)
        parent = posixpath.dirname(local)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(local, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
