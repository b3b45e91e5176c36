"""Rank 0's event stream: one `cpt_api.events` model a line in `<runDir>/events.jsonl`.

Each line is flushed as soon as it is written: the local runner tails this file, and a trainer
that is SIGKILLed must not take its last events with it. Each event is also logged (`event
{json}`): in a pod the run directory is a scratch volume gone with the pod, and the container's
log is what `kubectl logs` shows of its progress.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import IO, Any, Iterator, Union

from cpt_api.events import Anomaly, CheckpointSaved, Evaluated, Finished, Progress, Started
from cpt_api.manifest import EVENTS

EventModel = type[Started] | type[Progress] | type[Anomaly] | type[Evaluated] | \
    type[CheckpointSaved] | type[Finished]
Event = Union[Started, Progress, Anomaly, Evaluated, CheckpointSaved, Finished]
log = logging.getLogger(__name__)


def finite(value: float) -> float | None:
    """A value as an event field holds it: JSON has no NaN or Inf, so those become null."""
    return value if math.isfinite(value) else None


class EventLog:
    """Appends events; on ranks other than 0 it is a no-op so the loop needs no rank checks."""

    def __init__(self, run_dir: str, enabled: bool):
        self._file: IO[str] | None = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(os.path.join(run_dir, EVENTS), "a", encoding="utf-8")

    def emit(self, kind: EventModel, /, **fields: Any) -> Event | None:
        """The event written (None on ranks other than 0)."""
        if self._file is None:
            return None
        event = kind(time=time.time(), **fields)
        line = event.model_dump_json(by_alias=True)
        self._file.write(line + "\n")
        self._file.flush()
        log.info("event %s", line)
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


FINAL_REASONS = ("refused", "anomaly")
"""How a trainer ends that a restart would only repeat."""


def logged_newest_first(run_dir: str) -> Iterator[dict[str, Any]]:
    """The events an earlier trainer of this attempt wrote to its log, newest first (rank 0's
    run directory outlives its workers when torchrun restarts them in place); a line a killed
    trainer left half-written is skipped."""
    try:
        with open(os.path.join(run_dir, EVENTS), encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in reversed(lines):
        try:
            yield json.loads(line)
        except ValueError:
            continue


def earlier_ending(run_dir: str) -> tuple[str, str] | None:
    """(reason, message) of an earlier trainer of this attempt that refused its config or stopped
    on an anomaly rule, if one did: torchrun restarts a worker in place whatever it exited with,
    and the same trainer would end the same way, after loading the model once more."""
    for event in logged_newest_first(run_dir):
        if event.get("event") == "finished" and event.get("reason") in FINAL_REASONS:
            return str(event["reason"]), str(event.get("message", "")).removeprefix("refused: ")
    return None
