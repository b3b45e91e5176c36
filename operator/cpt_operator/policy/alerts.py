"""Which alerts may act, judged from the run alone (pure: the webhook and reconcile both ask).

An alert is bound to one attempt: the one its `attempt` label names, else the attempt running
when it arrived. It may act only while that attempt runs, only if it did not begin firing before
that attempt started (a breach of an earlier attempt that Alertmanager is still repeating), and
only once (its key is remembered in status once it acted, and it waits in the annotation until
then). Only gates the spec defines act, with that gate's own action and tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cpt_api.alerts import AlertRef, Verdict, breach_key, parse_time
from cpt_api.spec import CptRunSpec
from cpt_api.status import CptRunStatus, Phase


@dataclass(frozen=True, kw_only=True)
class Alerted:
    """One firing alert, as the webhook read it."""

    namespace: str
    run: str
    gate: str
    attempt: int | None = None
    fingerprint: str | None = None
    starts_at: str | None = None


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    ref: AlertRef | None = None
    """Set when recorded."""
    detail: str = ""


def gate_names(spec: CptRunSpec) -> list[str]:
    return sorted(g.name for g in spec.gates)


def unknown_gate(gate: str, spec: CptRunSpec) -> str:
    return f"gate {gate!r} is not defined by the run; its gates: {', '.join(gate_names(spec)) or 'none'}"


def admit(alert: Alerted, spec: CptRunSpec, status: CptRunStatus, waiting: Sequence[AlertRef]) -> Admission:
    if alert.gate not in gate_names(spec):
        return Admission(Verdict.unknown_gate, detail=unknown_gate(alert.gate, spec))
    if status.phase != Phase.running or status.attempt == 0:
        return Admission(Verdict.not_running, detail=f"run is {status.phase.value}")
    attempt = status.attempt if alert.attempt is None else alert.attempt
    if attempt != status.attempt or _began_before(alert.starts_at, status.attempt_started_at):
        return Admission(Verdict.attempt_ended,
                         detail=f"about attempt {attempt} (since {alert.starts_at or '?'}); "
                                f"attempt {status.attempt} runs since {status.attempt_started_at or '?'}")
    key = breach_key(alert.gate, attempt, alert.fingerprint, alert.starts_at)
    if key in status.handled_alerts or any(r.key == key for r in waiting):
        return Admission(Verdict.duplicate, detail=f"alert {key} already recorded")
    return Admission(Verdict.recorded, AlertRef(gate=alert.gate, attempt=attempt, key=key))


def due(refs: Sequence[AlertRef], spec: CptRunSpec, status: CptRunStatus) -> tuple[list[AlertRef], list[str]]:
    """The recorded breaches that act now, and why each of the others does not."""
    acting: list[AlertRef] = []
    dropped: list[str] = []
    names = gate_names(spec)
    for ref in refs:
        if ref.gate not in names:  # the spec changed since the alert was recorded
            dropped.append(unknown_gate(ref.gate, spec))
        elif ref.attempt != status.attempt:
            dropped.append(f"alert {ref.key} is about attempt {ref.attempt}, not {status.attempt}")
        elif ref.key in status.handled_alerts or any(r.key == ref.key for r in acting):
            dropped.append(f"alert {ref.key} already acted on")
        else:
            acting.append(ref)
    return acting, dropped


def _began_before(starts_at: str | None, attempt_started_at: str | None) -> bool:
    if not starts_at or not attempt_started_at:
        return False
    try:
        return parse_time(starts_at) < parse_time(attempt_started_at)
    except ValueError:
        return False
