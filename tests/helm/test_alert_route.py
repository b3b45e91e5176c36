"""The example Alertmanager route (examples/cluster/alertmanager-receiver.yaml) against the chart
and the alert contract: it reaches the Service the chart really renders, and amtool routes to the
operator only the alerts meant to act (never the chart's own informational alerts)."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cpt_api.alerts import ACTION_GATE, ACTION_LABEL
from tests.helm.chartlib import RULES, ROOT, find, run, template

pytestmark = pytest.mark.helm

EXAMPLE = ROOT / "examples" / "cluster" / "alertmanager-receiver.yaml"
RELEASE, NAMESPACE = "cpt-operator", "cpt-system"  # what the example's comment says it is for


def receiver(config: dict[str, Any]) -> dict[str, Any]:
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "cpt-operator"]
    assert route["matchers"] == [f'{ACTION_LABEL}="{ACTION_GATE}"']
    (rcv,) = [r for r in config["receivers"] if r["name"] == "cpt-operator"]
    return rcv


def test_the_example_route_reaches_the_service_and_secret_the_chart_renders(helm_bin: Path) -> None:
    objects = template(helm_bin, release=RELEASE, namespace=NAMESPACE)
    (service,) = [s for s in find(objects, "Service") if any(p["name"] == "webhook" for p in s["spec"]["ports"])]
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "webhook"]
    (hook,) = receiver(yaml.safe_load(EXAMPLE.read_text()))["webhook_configs"]
    url = urlsplit(hook["url"])
    assert (url.hostname, url.port, url.path) == (f"{service['metadata']['name']}.{NAMESPACE}.svc", port, "/alerts")
    secret = hook["http_config"]["authorization"]["credentials_file"].split("/")[-2]
    assert find(objects, "Secret", secret), f"no Secret {secret} in the chart"


def _route(amtool: Path, config: Path, labels: dict[str, str]) -> str:
    proc = run([amtool, "config", "routes", "test", f"--config.file={config}",
                *(f"{k}={v}" for k, v in labels.items())])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def chart_alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_no_chart_alert_carries_the_action_label() -> None:
    # they warn people or report a decision the operator already took; acting on them would
    # roll a run back twice
    assert [a["alert"] for a in chart_alerts() if ACTION_LABEL in a.get("labels", {})] == []


@pytest.mark.parametrize("alert", [a["alert"] for a in chart_alerts()])
def test_the_chart_alerts_are_not_routed_to_the_operator(amtool: Path, alert: str) -> None:
    (rule,) = [a for a in chart_alerts() if a["alert"] == alert]
    labels = {"alertname": alert, "namespace": "ml", "run": "legal-7b", "gate": "general-regression",
              "attempt": "1", **rule.get("labels", {})}
    assert _route(amtool, EXAMPLE, labels) == "default"


def test_an_action_alert_is_routed_to_the_operator(amtool: Path) -> None:
    labels = {"alertname": "CptGeneralPerplexityHigh", "namespace": "ml", "run": "legal-7b",
              "gate": "general-regression", ACTION_LABEL: ACTION_GATE}
    assert _route(amtool, EXAMPLE, labels) == "cpt-operator"
