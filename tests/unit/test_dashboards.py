"""The Grafana dashboards as dashboard models: structure Grafana needs to load them (schema
version, unique ids, a layout on the 24-column grid, Prometheus targets through the datasource
variable), variables that exist, series the trainer and operator export, and the views the
product promises (training, stability, fleet). Their PromQL runs against a real Prometheus in
tests/helm/test_rules.py (parsing) and tests/e2e/test_helm_promql.py (data)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "charts" / "cpt-operator" / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The series the trainer (rank 0) and the operator export; a dashboard naming anything else
# shows an empty panel.
TRAINER_SERIES = {
    "cpt_train_loss", "cpt_learning_rate", "cpt_grad_norm", "cpt_grad_norm_mean",
    "cpt_grad_norm_std", "cpt_anomaly_k", "cpt_tokens_per_second", "cpt_tokens_total", "cpt_step",
    "cpt_skipped_steps_total", "cpt_anomalies_total", "cpt_checkpoint_saves_total",
    "cpt_checkpoint_seconds", "cpt_last_checkpoint_step", "cpt_last_checkpoint_timestamp_seconds",
    "cpt_mixture_weight", "cpt_mixture_realised", "cpt_eval_metric", "cpt_eval_base_metric",
    "cpt_eval_step", "cpt_eval_tokens", "cpt_mfu", "cpt_gate_threshold", "cpt_trainer_up",
    "cpt_source_loss", "cpt_source_dropped_share",
}


def _operator_series() -> set[str]:
    """The operator's series, read from its own registry with one sample of each."""
    from cpt_api.goodput import Goodput
    from cpt_operator.kube.metrics import OperatorMetrics

    m = OperatorMetrics()
    m.observe_run("uid", "ns", "run", "Running", attempt=1, gpus=8, improved=True,
                  goodput=Goodput(share=0.9, seconds={"productive": 90.0, "starting": 10.0}), in_place_restarts=1)
    m.gate_breaches.labels("ns", "run", "gate").inc()
    m.rollbacks.labels("ns", "run", "base").inc()
    m.reconcile_seconds.observe(0.1)
    return {sample.name for family in m.registry.collect() for sample in family.samples}


OPERATOR_SERIES = _operator_series()
GRAFANA_BUILTINS = {"__interval", "__interval_ms", "__rate_interval", "__range", "__range_s"}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def board(name: str) -> dict[str, Any]:
    (path,) = [p for p in DASHBOARDS if p.stem == name]
    return load(path)


def exprs_of(panel: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for t in panel["targets"])


def panel_titled(board: dict[str, Any], pattern: str) -> dict[str, Any]:
    found = [p for p in all_panels(board)
             if p["type"] != "row" and re.search(pattern, p["title"], re.I)]
    assert len(found) == 1, f"{len(found)} panels match {pattern!r}"
    return found[0]


parametrize_dashboards = pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)


def test_the_three_dashboards_exist_with_unique_uids_and_titles() -> None:
    boards = [load(p) for p in DASHBOARDS]
    assert sorted(p.stem for p in DASHBOARDS) == ["fleet", "stability", "training"]
    assert len({b["uid"] for b in boards}) == 3 and len({b["title"] for b in boards}) == 3
    assert all(len(b["uid"]) <= 40 for b in boards)


@parametrize_dashboards
def test_dashboard_model_is_loadable(path: Path) -> None:
    b = load(path)
    assert isinstance(b["schemaVersion"], int) and b["schemaVersion"] >= 36
    assert "cpt" in b["tags"] and b["time"]["from"].startswith("now-")
    ids = [p["id"] for p in all_panels(b)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(b):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()


@parametrize_dashboards
def test_panels_do_not_overlap(path: Path) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(load(path)):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@parametrize_dashboards
def test_datasource_is_a_template_variable_and_every_used_variable_exists(path: Path) -> None:
    b = load(path)
    variables = b["templating"]["list"]
    assert variables[0] | {"current": {}} == variables[0] and variables[0]["type"] == "datasource"
    assert variables[0]["name"] == "datasource" and variables[0]["query"] == "prometheus"
    defined = {v["name"] for v in variables} | GRAFANA_BUILTINS
    for v in variables[1:]:
        assert v["datasource"] == DATASOURCE and v["definition"].startswith("label_values(")
    used = {p["repeat"] for p in all_panels(b) if "repeat" in p}
    for text in queries(b) + [p["title"] for p in all_panels(b)]:
        used |= set(re.findall(r"\$\{?(\w+)", text))
    assert used <= defined, used - defined


@parametrize_dashboards
def test_queries_name_only_exported_series(path: Path) -> None:
    named = set()
    for expr in queries(load(path)):
        named |= set(re.findall(r"\bcpt_[a-z_]+\b", expr))
    assert named and named <= TRAINER_SERIES | OPERATOR_SERIES, named - TRAINER_SERIES - OPERATOR_SERIES


@pytest.mark.parametrize("name, variables", [
    ("training", {"namespace", "run", "attempt"}),
    ("stability", {"namespace", "run", "suite"}),
    ("fleet", {"namespace"}),
])
def test_run_and_namespace_are_templated(name: str, variables: set[str]) -> None:
    b = board(name)
    assert {v["name"] for v in b["templating"]["list"]} == {"datasource"} | variables


def test_training_dashboard_shows_the_optimisation_signals() -> None:
    b = board("training")
    assert "cpt_train_loss" in exprs_of(panel_titled(b, r"^training loss"))
    assert "cpt_learning_rate" in exprs_of(panel_titled(b, r"^learning rate"))
    assert "cpt_tokens_per_second" in exprs_of(panel_titled(b, r"^tokens per second"))
    assert "cpt_mfu" in exprs_of(panel_titled(b, r"^model flops utilisation"))
    grad = panel_titled(b, r"gradient norm and anomaly band")
    text = exprs_of(grad)
    # The band is mean ± k·std, drawn as an area between its upper and lower edge.
    assert "cpt_grad_norm{" in text and "cpt_grad_norm_mean" in text
    assert "cpt_anomaly_k" in text and "cpt_grad_norm_std" in text
    fills = [prop for o in grad["fieldConfig"]["overrides"] for prop in o["properties"]
             if prop["id"] == "custom.fillBelowTo"]
    legends = {t["legendFormat"] for t in grad["targets"]}
    assert fills and all(f["value"] in legends for f in fills)


def test_stability_dashboard_draws_base_gates_tokens_and_rollbacks() -> None:
    b = board("stability")
    suite = panel_titled(b, r"\$suite against base and gates")
    assert suite["repeat"] == "suite"
    text = exprs_of(suite)
    assert "cpt_eval_metric" in text and "cpt_eval_base_metric" in text and "cpt_gate_threshold" in text
    gap = exprs_of(panel_titled(b, r"^stability gap"))
    assert "cpt_eval_metric" in gap and "/ on(namespace, run, attempt, suite, metric) cpt_eval_base_metric" in gap
    tokens = panel_titled(b, r"over training tokens")
    assert tokens["type"] == "xychart" and "cpt_eval_tokens" in exprs_of(tokens)
    assert tokens["options"]["dims"]["x"] in {t["legendFormat"] for t in tokens["targets"]}
    rollbacks = [a for a in b["annotations"]["list"] if "cpt_rollbacks_total" in a.get("expr", "")]
    assert rollbacks and rollbacks[0]["enable"] and rollbacks[0]["datasource"] == DATASOURCE


def test_fleet_dashboard_counts_phases_gpu_hours_and_rollbacks() -> None:
    b = board("fleet")
    assert "by (phase) (cpt_runs)" in exprs_of(panel_titled(b, r"^runs by phase"))
    gpu_hours = exprs_of(panel_titled(b, r"^GPU-hours"))
    # GPU count integrated over the range: sum of samples × step (ms) / ms per hour.
    assert "sum_over_time(cpt_run_gpus" in gpu_hours and "$__interval_ms / 3600000" in gpu_hours
    assert "cpt_rollbacks_total" in exprs_of(panel_titled(b, r"^rollbacks$"))
    table = panel_titled(b, r"^runs$")
    renamed = next(t for t in table["transformations"] if t["id"] == "organize")["options"]["renameByName"]
    assert set(renamed) == {f"Value #{t['refId']}" for t in table["targets"]}
