"""The alert contract: which alerts may act on a CptRun, and how one breach is told from another.

Alert rules, the Alertmanager route that sends them to the operator and the operator's webhook
all read these names. An alert acts only if it carries `cpt_action="gate"` and names, in `gate`,
a gate the run's spec defines; the operator then applies that gate's action and tuning. Every
other alert (warnings, reports of a decision the operator already took) is informational: the
example route does not send it and the webhook ignores it if it comes anyway.

A breach is about one attempt. Alertmanager re-sends a firing alert (repeat_interval, restarts,
one copy per replica); each copy has the same fingerprint and startsAt, so the pair is the
breach's key and the run's status remembers the keys that acted.
"""
from __future__ import annotations

import json
from datetime import datetime
from enum import Enum

from pydantic import Field, ValidationError

from .base import SpecModel

ACTION_LABEL = "cpt_action"
ACTION_GATE = "gate"
"""`cpt_action="gate"`: apply the action (rollback, tune, stop) of the gate named in `gate`."""
RUN_LABEL = "run"
NAMESPACE_LABEL = "namespace"
GATE_LABEL = "gate"
ATTEMPT_LABEL = "attempt"
"""Optional: the attempt the alert is about (the trainer's series carry it)."""

HANDLED_ALERTS_KEPT = 32
"""Keys of acted-on alerts kept in status.handledAlerts; older ones have long stopped firing."""


class Verdict(str, Enum):
    """What the webhook and the operator did with one alert: reported in the webhook's response
    and in events, so people and scripts match on these."""

    recorded = "Recorded"
    not_an_action = "NotAnAction"
    """No `cpt_action="gate"` label: an informational alert."""
    duplicate = "Duplicate"
    """The same firing alert (fingerprint and startsAt) was already recorded or acted on."""
    attempt_ended = "AttemptEnded"
    """About an attempt that is not the current one, or began firing before the current one
    started."""
    not_running = "NotRunning"
    """The run has no running attempt to act on (pending, rolling back, finished)."""
    unknown_gate = "UnknownGate"
    no_such_run = "NoSuchRun"


class AlertRef(SpecModel):
    """One breach waiting for the next reconcile pass (the webhook writes these)."""

    gate: str
    attempt: int
    key: str
    """`fingerprint@startsAt` for an Alertmanager / Grafana alert; a plain request, which has no
    identity of its own, is `gate@attempt`."""


class _Refs(SpecModel):
    refs: list[AlertRef] = Field(default_factory=list)


def breach_key(gate: str, attempt: int, fingerprint: str | None, starts_at: str | None) -> str:
    if fingerprint or starts_at:
        return f"{fingerprint or gate}@{starts_at or attempt}"
    return f"{gate}@{attempt}"


def encode_refs(refs: list[AlertRef]) -> str:
    return json.dumps([r.dump() for r in refs], separators=(",", ":"), sort_keys=True)


def decode_refs(value: str | None) -> list[AlertRef]:
    """The annotation's breaches; a value that is not ours (hand-edited, an older format) holds
    none: it carries no attempt, so it could not be told from a stale alert anyway."""
    if not value:
        return []
    try:
        return _Refs.model_validate({"refs": json.loads(value)}).refs
    except (ValueError, ValidationError):
        return []


def parse_time(value: str) -> float:
    """RFC 3339 as Alertmanager writes it (nanoseconds, `Z`) -> seconds since the epoch."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
