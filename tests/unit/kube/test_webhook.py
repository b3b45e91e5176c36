"""The alert webhook: who may call it, what it understands, what it records."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cpt_operator.kube.webhook import Breach, PayloadError, authorized, make_app, parse_payload

ALERTMANAGER = {
    "version": "4", "status": "firing", "receiver": "cpt",
    "commonLabels": {"namespace": "ml"},
    "alerts": [
        {"status": "firing", "labels": {"alertname": "CptGeneralRegression", "run": "legal-7b",
                                        "gate": "general-regression"}},
        {"status": "resolved", "labels": {"alertname": "CptSafety", "run": "legal-7b", "gate": "safety"}},
        {"status": "firing", "labels": {"alertname": "CptAnomalies", "run": "other", "namespace": "team"}},
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


def test_alertmanager_payload_names_firing_breaches_only():
    assert parse_payload(ALERTMANAGER) == [
        Breach("ml", "legal-7b", "general-regression"),
        Breach("team", "other", "CptAnomalies"),  # no gate label: the alert's name
    ]


def test_a_simple_payload_names_one_breach():
    assert parse_payload({"run": "r", "namespace": "n", "gate": "g"}) == [Breach("n", "r", "g")]


@pytest.mark.parametrize("payload, message", [
    ([], "JSON object"),
    ({"run": "r", "gate": "g"}, "missing namespace"),
    ({"alerts": "x"}, "must be a list"),
    ({"alerts": [{"labels": {"namespace": "n", "gate": "g"}}]}, r"alerts\[0\].labels: missing run"),
], ids=["not an object", "no namespace", "alerts not a list", "an alert without a run"])
def test_malformed_payloads_are_refused_with_the_reason(payload, message):
    with pytest.raises(PayloadError, match=message):
        parse_payload(payload)


def test_the_server_records_breaches_and_refuses_strangers():
    recorded: list[Breach] = []

    def record(breach: Breach) -> bool:
        if breach.run == "missing":
            return False
        recorded.append(breach)
        return True

    async def scenario() -> list[tuple[int, dict]]:
        client = TestClient(TestServer(make_app("tok", record)))
        await client.start_server()
        try:
            out = []
            for headers, body in (({}, {"run": "r", "namespace": "n", "gate": "g"}),
                                  ({"Authorization": "Bearer tok"}, {"run": "r", "namespace": "n"}),
                                  ({"Authorization": "Bearer tok"}, ALERTMANAGER),
                                  ({"Authorization": "Bearer tok"}, {"run": "missing", "namespace": "n", "gate": "g"})):
                resp = await client.post("/alerts", data=json.dumps(body), headers=headers)
                out.append((resp.status, await resp.json()))
            return out
        finally:
            await client.close()

    (no_auth, bad, good, unknown) = asyncio.run(scenario())
    assert no_auth[0] == 401 and bad[0] == 400 and "missing gate" in bad[1]["error"]
    assert good[0] == 202 and len(good[1]["recorded"]) == 2
    assert unknown[0] == 404 and unknown[1]["unknown"] == [{"namespace": "n", "run": "missing", "gate": "g"}]
    assert recorded == parse_payload(ALERTMANAGER)
