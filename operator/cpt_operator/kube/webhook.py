"""An authenticated webhook through which an alert rule names a breached gate of a run.

It accepts Alertmanager's (and Grafana's, which is the same shape) webhook payload, or a plain
`{"run": ..., "namespace": ..., "gate": ...}`. A breach is recorded as an annotation on the
CptRun; the next reconcile pass acts on it exactly as on a gate that fired on metrics.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from aiohttp import web

log = logging.getLogger(__name__)


class PayloadError(ValueError):
    pass


@dataclass(frozen=True)
class Breach:
    namespace: str
    run: str
    gate: str


def authorized(header: str | None, token: str) -> bool:
    """A bearer token, compared in constant time; no token configured means no access."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def _breach(labels: Mapping[str, Any], where: str) -> Breach:
    namespace = labels.get("namespace") or labels.get("exported_namespace")
    gate = labels.get("gate") or labels.get("alertname")
    missing = [k for k, v in (("run", labels.get("run")), ("namespace", namespace), ("gate", gate)) if not v]
    if missing:
        raise PayloadError(f"{where}: missing {', '.join(missing)}")
    return Breach(str(namespace), str(labels["run"]), str(gate))


def parse_payload(payload: Any) -> list[Breach]:
    """Breaches named by a payload; resolved alerts name none."""
    if not isinstance(payload, dict):
        raise PayloadError("expected a JSON object")
    if "alerts" not in payload:
        return [_breach(payload, "payload")]
    alerts = payload["alerts"]
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    common = payload.get("commonLabels") or {}
    out = []
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        if alert.get("status", payload.get("status", "firing")) != "firing":
            continue
        out.append(_breach({**common, **(alert.get("labels") or {})}, f"alerts[{i}].labels"))
    return sorted(set(out), key=lambda b: (b.namespace, b.run, b.gate))


Recorder = Callable[[Breach], bool]
"""Records one breach; False when the run does not exist."""


def make_app(token: str, record: Recorder) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        if not authorized(request.headers.get("Authorization"), token):
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            breaches = parse_payload(json.loads(await request.read()))
        except (ValueError, UnicodeDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        recorded: list[dict[str, str]] = []
        unknown: list[dict[str, str]] = []
        for breach in breaches:
            found = await loop.run_in_executor(None, record, breach)
            (recorded if found else unknown).append(breach.__dict__)
            log.info("alert for %s/%s gate %s: %s", breach.namespace, breach.run, breach.gate,
                     "recorded" if found else "no such run")
        return web.json_response({"recorded": recorded, "unknown": unknown}, status=202 if recorded or not unknown else 404)

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
