"""Alert rules and dashboard PromQL through promtool: every expression parses, the rules load as
plain Prometheus rule files and as the chart's PrometheusRule, and the promtool unit tests of the
alerts (charts/cpt-operator/rules/tests/) pass and cover every alert firing and staying quiet."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm.chartlib import (DASHBOARDS, FULL_VALUES, RULE_TESTS, RULES, as_rule_file, dashboard_queries,
                      find, run, substitute, template)

pytestmark = pytest.mark.prometheus

# Values for the dashboards' own variables; they only need to make the expressions concrete.
DASHBOARD_VARIABLES = {"datasource": "prom", "namespace": "ml", "run": "r1", "attempt": "1",
                       "suite": "general"}


def alert_names() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_rule_file_loads_in_plain_prometheus(promtool: Path) -> None:
    proc = run([promtool, "check", "rules", RULES])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in proc.stdout


@pytest.mark.helm
def test_chart_prometheus_rule_loads_in_prometheus(promtool: Path, helm_bin: Path,
                                                   tmp_path: Path) -> None:
    (rule,) = find(template(helm_bin, values=[FULL_VALUES]), "PrometheusRule")
    path = tmp_path / "from-chart.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = run([promtool, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_pass(promtool: Path) -> None:
    assert RULE_TESTS
    proc = run([promtool, "test", "rules", *RULE_TESTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alert_names()) <= fired, set(alert_names()) - fired
    assert set(alert_names()) <= quiet, set(alert_names()) - quiet


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_expression_parses(promtool: Path, tmp_path: Path, dashboard: Path) -> None:
    queries = dashboard_queries(dashboard)
    concrete = [type(q)(q.where, substitute(q.expr, DASHBOARD_VARIABLES)) for q in queries]
    path = tmp_path / f"{dashboard.stem}.rules.yaml"
    path.write_text(as_rule_file(concrete))
    proc = run([promtool, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(concrete)} rules found" in proc.stdout
