"""Shared by the chart tests: rendering the chart with helm, and the PromQL of its dashboards and
alert rules with Grafana's template variables replaced by concrete values.

Imported by path from tests/e2e/test_helm_*.py (tests/ is not a package).
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cpt-operator"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "rules" / "cpt-operator.rules.yaml"
RULE_TESTS = sorted((CHART / "rules" / "tests").glob("*.yaml"))
FULL_VALUES = Path(__file__).resolve().parent / "values-full.yaml"

# Render with the test cluster's version: the helm built from source defaults to v1.20.
KUBE_VERSION = "1.36.3"


def run(argv: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


def template(helm: Path, *args: str, values: Sequence[Path] = (), release: str = "cpt",
             namespace: str = "cpt-system", include_crds: bool = False) -> list[dict[str, Any]]:
    """`helm template` output as a list of objects; fails the test with helm's stderr."""
    argv: list[str | Path] = [helm, "template", release, CHART, "-n", namespace,
                              "--kube-version", KUBE_VERSION, *args]
    for path in values:
        argv += ["-f", path]
    if include_crds:
        argv.append("--include-crds")
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(objects: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


# --------------------------------------------------------------------------- PromQL

@dataclass(frozen=True)
class Query:
    where: str
    expr: str

    def __str__(self) -> str:
        return f"{self.where}: {self.expr}"


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path: Path) -> list[Query]:
    """Panel targets, annotation queries and variable queries of one dashboard."""
    board = load_dashboard(path)
    name = path.stem
    out = [Query(f"{name} / {p['title']} / {t['refId']}", t["expr"])
           for p in panels(board) for t in p.get("targets", []) if "expr" in t]
    out += [Query(f"{name} / annotation {a['name']}", a["expr"])
            for a in board["annotations"]["list"] if "expr" in a]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out.append(Query(f"{name} / variable {var['name']}", label_values_selector(var["definition"])))
    return out


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def label_values_selector(definition: str) -> str:
    """Grafana's `label_values(selector, label)` is no PromQL; the selector in it is."""
    match = _LABEL_VALUES.match(definition.strip())
    assert match and match["selector"], f"unexpected variable query {definition!r}"
    return match["selector"]


def rule_queries() -> list[Query]:
    doc = yaml.safe_load(RULES.read_text())
    return [Query(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for group in doc["groups"] for r in group["rules"]]


# Grafana's built-in variables, longest name first so $__interval_ms is not read as $__interval.
GRAFANA_BUILTINS = {
    "$__interval_ms": "1000",
    "$__interval": "1s",
    "$__rate_interval": "10s",
    "$__range_s": "120",
    "$__range": "2m",
}


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}) with concrete values; fail on unknown ones."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, expr)
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"unresolved variables {left} in {expr}"
    return expr


def as_rule_file(queries: Sequence[Query]) -> str:
    """A rule file with one recording rule per query, for `promtool check rules` to parse."""
    rules = [{"record": f"cpt_check:q{i}", "expr": q.expr} for i, q in enumerate(queries)]
    return yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]})
