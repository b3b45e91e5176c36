"""Which alerts the webhook records: judged from the run alone (spec gates, status, waiting ones)."""
from __future__ import annotations

import pytest

from cpt_api.alerts import AlertRef, Verdict, decode_refs, encode_refs
from cpt_api.status import CptRunStatus, Phase
from cpt_operator.policy.alerts import Alerted, admit

from tests.unit.kube.cases import build_spec

STARTED = "2026-11-30T12:00:00Z"
STATUS = CptRunStatus(phase=Phase.running, attempt=2, attempt_started_at=STARTED,
                      handled_alerts=["old@2026-11-30T11:00:00Z"])
WAITING = [AlertRef(gate="general-regression", attempt=2, key="wait@2026-11-30T12:10:00Z")]


def alerted(**kw) -> Alerted:
    return Alerted(**{"namespace": "ml", "run": "legal-7b", "gate": "general-regression", **kw})


@pytest.mark.parametrize("alert, status, verdict", [
    (alerted(), STATUS, Verdict.recorded),
    (alerted(attempt=2, fingerprint="f", starts_at="2026-11-30T12:05:00.5Z"), STATUS, Verdict.recorded),
    (alerted(gate="safety"), STATUS, Verdict.unknown_gate),
    (alerted(attempt=1), STATUS, Verdict.attempt_ended),
    (alerted(fingerprint="f", starts_at="2026-11-30T11:59:59.999999999Z"), STATUS, Verdict.attempt_ended),
    (alerted(fingerprint="old", starts_at="2026-11-30T11:00:00Z", attempt=2),
     STATUS.model_copy(update={"attempt_started_at": None}), Verdict.duplicate),
    (alerted(fingerprint="wait", starts_at="2026-11-30T12:10:00Z"), STATUS, Verdict.duplicate),
    (alerted(), STATUS.model_copy(update={"phase": Phase.rolling_back}), Verdict.not_running),
    (alerted(), CptRunStatus(), Verdict.not_running),
], ids=["a plain request about the running attempt", "an Alertmanager alert that began during the attempt",
        "a gate the spec does not define", "an alert labelled with an earlier attempt",
        "an alert that began firing before the attempt started", "an alert that already acted",
        "an alert already waiting for the next pass", "a run that is rolling back", "a run not started yet"])
def test_admission(alert, status, verdict):
    admission = admit(alert, build_spec(), status, WAITING)
    assert admission.verdict == verdict
    assert (admission.ref is not None) == (verdict == Verdict.recorded)


def test_a_recorded_alert_is_bound_to_the_running_attempt_and_keyed_by_its_firing():
    spec = build_spec()
    plain = admit(alerted(), spec, STATUS, []).ref
    fired = admit(alerted(fingerprint="f", starts_at="2026-11-30T12:05:00Z"), spec, STATUS, []).ref
    assert plain == AlertRef(gate="general-regression", attempt=2, key="general-regression@2")
    assert fired == AlertRef(gate="general-regression", attempt=2, key="f@2026-11-30T12:05:00Z")


def test_the_unknown_gate_answer_names_the_gates_the_run_defines():
    admission = admit(alerted(gate="safety"), build_spec(), STATUS, [])
    assert admission.detail == "gate 'safety' is not defined by the run; its gates: general-regression"


def test_refs_round_trip_and_foreign_values_hold_none():
    assert decode_refs(encode_refs(WAITING)) == WAITING
    assert decode_refs("general-regression") == decode_refs('{"gate": "x"}') == decode_refs(None) == []
