"""The alert webhook: who may call it, which alerts may act, and what it answers."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cpt_api.alerts import ACTION_GATE, ACTION_LABEL, Verdict
from cpt_operator.kube.webhook import PayloadError, authorized, make_app, parse_payload
from cpt_operator.policy.alerts import Admission, Alerted

ACT = {ACTION_LABEL: ACTION_GATE}
STARTS = "2026-11-30T12:00:00.123456789Z"
ALERTMANAGER = {
    "version": "4", "status": "firing", "receiver": "cpt",
    "commonLabels": {"namespace": "ml"},
    "alerts": [
        {"status": "firing", "fingerprint": "a1b2", "startsAt": STARTS,
         "labels": {"alertname": "CptGeneralRegression", "run": "legal-7b", "gate": "general-regression",
                    "attempt": "3", **ACT}},
        {"status": "resolved", "labels": {"alertname": "CptSafety", "run": "legal-7b", "gate": "safety", **ACT}},
        # the chart's own alerts: a warning before a gate acts, and a report after it acted
        {"status": "firing", "labels": {"alertname": "CptStabilityGapOpening", "run": "legal-7b",
                                        "gate": "general-regression", "severity": "warning"}},
        {"status": "firing", "labels": {"alertname": "CptGateBreached", "run": "legal-7b",
                                        "gate": "general-regression", "severity": "critical"}},
    ],
}


@pytest.mark.parametrize("header, token, ok", [
    ("Bearer s3cret", "s3cret", True),
    ("Bearer wrong", "s3cret", False),
    ("Basic s3cret", "s3cret", False),
    (None, "s3cret", False),
    ("Bearer ", "", False),
], ids=["the right token", "a wrong token", "another scheme", "no header", "no token configured"])
def test_bearer_token(header, token, ok):
    assert authorized(header, token) is ok


def test_only_firing_alerts_with_the_action_label_ask_for_an_action():
    parsed = parse_payload(ALERTMANAGER)
    assert parsed.alerts == [Alerted(namespace="ml", run="legal-7b", gate="general-regression", attempt=3,
                                     fingerprint="a1b2", starts_at=STARTS)]
    assert [(i["alertname"], i["reason"]) for i in parsed.ignored] == [
        ("CptStabilityGapOpening", "NotAnAction"), ("CptGateBreached", "NotAnAction")]


def test_a_simple_payload_needs_the_action_label_too():
    assert parse_payload({"run": "r", "namespace": "n", "gate": "g", **ACT}).alerts == [
        Alerted(namespace="n", run="r", gate="g")]
    assert parse_payload({"run": "r", "namespace": "n", "gate": "g"}).alerts == []


@pytest.mark.parametrize("payload, message", [
    ([], "JSON object"),
    ({"run": "r", "gate": "g", **ACT}, "missing namespace"),
    ({"alerts": "x"}, "must be a list"),
    ({"alerts": [{"labels": {"namespace": "n", "gate": "g", **ACT}}]}, r"alerts\[0\].labels: missing run"),
    ({"alerts": [{"labels": {"namespace": "n", "run": "r", "alertname": "X", **ACT}}]}, "missing gate"),
    ({"run": "r", "namespace": "n", "gate": "g", "attempt": "two", **ACT}, "attempt must be a number"),
], ids=["not an object", "no namespace", "alerts not a list", "an action without a run",
        "an action without a gate (the alert's name is not one)", "an attempt that is no number"])
def test_malformed_payloads_are_refused_with_the_reason(payload, message):
    with pytest.raises(PayloadError, match=message):
        parse_payload(payload)


def _post_all(record, bodies):
    async def scenario() -> list[tuple[int, dict]]:
        client = TestClient(TestServer(make_app("tok", record)))
        await client.start_server()
        try:
            out = []
            for headers, body in bodies:
                resp = await client.post("/alerts", data=json.dumps(body), headers=headers)
                out.append((resp.status, await resp.json()))
            return out
        finally:
            await client.close()
    return asyncio.run(scenario())


def test_the_server_answers_what_it_did_with_each_alert():
    seen: list[Alerted] = []

    def record(alert: Alerted) -> Admission:
        seen.append(alert)
        if alert.run == "missing":
            return Admission(Verdict.no_such_run, detail="no CptRun n/missing")
        if alert.gate == "nope":
            return Admission(Verdict.unknown_gate, detail="its gates: general-regression")
        return Admission(Verdict.duplicate if len(seen) > 1 else Verdict.recorded)

    auth = {"Authorization": "Bearer tok"}
    no_auth, bad, good, again, informational, missing, unknown = _post_all(record, [
        ({}, {"run": "r", "namespace": "n", "gate": "g", **ACT}),
        (auth, {"run": "r", "namespace": "n", **ACT}),
        (auth, ALERTMANAGER),
        (auth, ALERTMANAGER),
        (auth, {"alerts": [ALERTMANAGER["alerts"][3]], "commonLabels": {"namespace": "ml"}}),
        (auth, {"run": "missing", "namespace": "n", "gate": "g", **ACT}),
        (auth, {"run": "r", "namespace": "n", "gate": "nope", **ACT}),
    ])
    assert no_auth[0] == 401 and bad[0] == 400 and "missing gate" in bad[1]["error"]
    assert good[0] == 202 and [r["gate"] for r in good[1]["recorded"]] == ["general-regression"]
    assert {i["alertname"] for i in good[1]["ignored"]} == {"CptStabilityGapOpening", "CptGateBreached"}
    assert again[0] == 200 and not again[1]["recorded"] and "Duplicate" in {i["reason"] for i in again[1]["ignored"]}
    assert informational == (200, {"recorded": [], "refused": [], "ignored": [
        {"namespace": "ml", "run": "legal-7b", "gate": "general-regression", "alertname": "CptGateBreached",
         "reason": "NotAnAction", "detail": 'no cpt_action="gate" label: informational'}]})
    assert missing[0] == 404 and missing[1]["refused"][0]["reason"] == "NoSuchRun"
    assert unknown[0] == 422 and "general-regression" in unknown[1]["refused"][0]["detail"]
    assert [a.run for a in seen] == ["legal-7b", "legal-7b", "missing", "r"]  # informational ones never reach a run
