"""An authenticated webhook through which an alert rule names a breached gate of a run.

It accepts Alertmanager's (and Grafana's, which is the same shape) webhook payload, or a plain
`{"run": ..., "namespace": ..., "gate": ..., "cpt_action": "gate"}`. Only alerts that carry the
action label (`cpt_api.alerts`) may act; the others are reported as ignored. A breach of
a gate the run defines, about its running attempt and not seen before, is recorded as an
annotation on the CptRun; the next reconcile pass acts on it exactly as on a gate that fired on
metrics. A gate the run does not define is refused (422, naming the run's gates).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from aiohttp import web

from cpt_api.alerts import (ACTION_GATE, ACTION_LABEL, ATTEMPT_LABEL, GATE_LABEL, NAMESPACE_LABEL, RUN_LABEL,
                          Verdict)
from ..policy.alerts import Admission, Alerted

log = logging.getLogger(__name__)


class PayloadError(ValueError):
    pass


@dataclass(frozen=True)
class Parsed:
    alerts: list[Alerted] = field(default_factory=list)
    """Firing alerts that ask for an action."""
    ignored: list[dict[str, str]] = field(default_factory=list)
    """Firing alerts without the action label: who they were about, and why nothing was done."""


def authorized(header: str | None, token: str) -> bool:
    """A bearer token, compared in constant time; no token configured means no access."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def _names(labels: Mapping[str, Any]) -> dict[str, str]:
    # only the target's own namespace label: exported_namespace is what a pod claimed (honorLabels: false)
    namespace = labels.get(NAMESPACE_LABEL)
    return {k: str(v) for k, v in (("namespace", namespace), ("run", labels.get(RUN_LABEL)),
                                   ("gate", labels.get(GATE_LABEL)), ("alertname", labels.get("alertname")))
            if v}


def _alerted(labels: Mapping[str, Any], alert: Mapping[str, Any], where: str) -> Alerted:
    names = _names(labels)
    missing = [k for k in ("run", "namespace", "gate") if k not in names]
    if missing:
        raise PayloadError(f"{where}: missing {', '.join(missing)}")
    attempt = labels.get(ATTEMPT_LABEL)
    if attempt is not None and not str(attempt).isdigit():
        raise PayloadError(f"{where}: attempt must be a number, not {attempt!r}")
    return Alerted(namespace=names["namespace"], run=names["run"], gate=names["gate"],
                   attempt=None if attempt is None else int(attempt),
                   fingerprint=_text(alert.get("fingerprint")), starts_at=_text(alert.get("startsAt")))


def _text(value: Any) -> str | None:
    return str(value) if value else None


def _one(labels: Mapping[str, Any], alert: Mapping[str, Any], where: str, out: Parsed) -> None:
    if labels.get(ACTION_LABEL) != ACTION_GATE:
        out.ignored.append({**_names(labels), "reason": Verdict.not_an_action.value,
                            "detail": f'no {ACTION_LABEL}="{ACTION_GATE}" label: informational'})
    else:
        out.alerts.append(_alerted(labels, alert, where))


def parse_payload(payload: Any) -> Parsed:
    """The firing alerts of a payload, split into those that ask for an action and the rest;
    resolved alerts are left out."""
    if not isinstance(payload, dict):
        raise PayloadError("expected a JSON object")
    out = Parsed()
    if "alerts" not in payload:
        _one(payload, {}, "payload", out)
        return out
    alerts = payload["alerts"]
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    common = payload.get("commonLabels") or {}
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        if alert.get("status", payload.get("status", "firing")) != "firing":
            continue
        _one({**common, **(alert.get("labels") or {})}, alert, f"alerts[{i}].labels", out)
    return out


Recorder = Callable[[Alerted], Admission]
"""Judges one alert against its run and records it if it may act."""

_REFUSED = {Verdict.unknown_gate, Verdict.no_such_run}


def _status(verdicts: list[Verdict]) -> int:
    """202 when something was recorded and nothing refused; 404 / 422 when a run or gate does not
    exist (Alertmanager does not retry a 4xx, and logs it); 200 when everything was ignored."""
    refused = [v for v in verdicts if v in _REFUSED]
    if refused:
        return 404 if all(v == Verdict.no_such_run for v in refused) else 422
    return 202 if Verdict.recorded in verdicts else 200


def make_app(token: str, record: Recorder) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        if not authorized(request.headers.get("Authorization"), token):
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            parsed = parse_payload(json.loads(await request.read()))
        except (ValueError, UnicodeDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        out: dict[str, list[dict[str, Any]]] = {"recorded": [], "ignored": list(parsed.ignored), "refused": []}
        verdicts = [Verdict.not_an_action for _ in parsed.ignored]
        for alert in parsed.alerts:
            admission = await loop.run_in_executor(None, record, alert)
            verdicts.append(admission.verdict)
            entry = {"namespace": alert.namespace, "run": alert.run, "gate": alert.gate,
                     "reason": admission.verdict.value, "detail": admission.detail}
            kind = ("recorded" if admission.verdict == Verdict.recorded
                    else "refused" if admission.verdict in _REFUSED else "ignored")
            out[kind].append(entry)
            log.info("alert for %s/%s gate %s: %s %s", alert.namespace, alert.run, alert.gate,
                     admission.verdict.value, admission.detail)
        return web.json_response(out, status=_status(verdicts))

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/", receive)
    app.router.add_post("/alerts", receive)
    app.router.add_get("/healthz", health)
    return app


async def serve(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
