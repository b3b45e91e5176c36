"""Follow a trainer's events.jsonl as it grows (a partial last line waits for the next read)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cpt_api.events import parse_event


class EventFollower:
    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[Any]:  # api.events models
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(parse_event(line.decode()))
                except (ValidationError, UnicodeDecodeError):
                    continue  # a line from a newer trainer version: skip it rather than stop the run
        return events
