"""The dashboards' and alerts' PromQL against the real test Prometheus scraping the series the
trainer and the operator export: every dashboard query returns data, and every alert rule, loaded
as plain Prometheus loads it, goes pending or firing on series shaped like its incident.

The series are served with prometheus_client from this process under the names and labels of
trainer/cpt_trainer/metrics.py and the operator's exporter; Prometheus adds `instance` and `job`
as it does in a cluster, so label matching is exercised as it runs there."""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helm import chartlib

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(180)]

BASE = ("run", "namespace", "attempt")


@dataclass
class Exporter:
    """The trainer and operator series of a few runs in one namespace, changing as training does."""

    namespace: str
    registry: Any
    metrics: dict[str, Any]
    stop: threading.Event


def build_registry() -> tuple[Any, dict[str, Any]]:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    g = lambda name, *extra: Gauge(name, name, BASE + extra, registry=r)  # noqa: E731
    c = lambda name, *extra: Counter(name, name, BASE + extra, registry=r)  # noqa: E731
    m = {name: g(name) for name in (
        "cpt_train_loss", "cpt_learning_rate", "cpt_grad_norm", "cpt_grad_norm_mean",
        "cpt_grad_norm_std", "cpt_anomaly_k", "cpt_tokens_per_second", "cpt_tokens_total",
        "cpt_step", "cpt_checkpoint_seconds", "cpt_last_checkpoint_step",
        "cpt_last_checkpoint_timestamp_seconds", "cpt_eval_step", "cpt_eval_tokens", "cpt_mfu",
        "cpt_trainer_up")}
    # prometheus_client appends _total to counter names itself.
    m["cpt_skipped_steps_total"] = c("cpt_skipped_steps")
    m["cpt_checkpoint_saves_total"] = c("cpt_checkpoint_saves")
    m["cpt_anomalies_total"] = c("cpt_anomalies", "kind")
    m["cpt_mixture_weight"] = g("cpt_mixture_weight", "source", "role")
    m["cpt_mixture_realised"] = g("cpt_mixture_realised", "source", "role")
    m["cpt_source_loss"] = g("cpt_source_loss", "source", "role")
    m["cpt_source_dropped_share"] = g("cpt_source_dropped_share", "source", "role")
    m["cpt_eval_metric"] = g("cpt_eval_metric", "suite", "metric")
    m["cpt_eval_base_metric"] = g("cpt_eval_base_metric", "suite", "metric")
    m["cpt_gate_threshold"] = g("cpt_gate_threshold", "gate", "suite", "metric")
    m["cpt_gate_breaches_total"] = Counter("cpt_gate_breaches", "", ("namespace", "run", "gate"), registry=r)
    m["cpt_rollbacks_total"] = Counter("cpt_rollbacks", "", ("namespace", "run", "target"), registry=r)
    m["cpt_runs"] = Gauge("cpt_runs", "", ("phase",), registry=r)
    m["cpt_run_attempt"] = Gauge("cpt_run_attempt", "", ("namespace", "run"), registry=r)
    m["cpt_run_gpus"] = Gauge("cpt_run_gpus", "", ("namespace", "run"), registry=r)
    m["cpt_run_improved"] = Gauge("cpt_run_improved", "", ("namespace", "run"), registry=r)
    m["cpt_run_goodput_ratio"] = Gauge("cpt_run_goodput_ratio", "", ("namespace", "run"), registry=r)
    m["cpt_run_time_seconds"] = Gauge("cpt_run_time_seconds", "", ("namespace", "run", "cause"), registry=r)
    m["cpt_run_in_place_restarts"] = Gauge("cpt_run_in_place_restarts", "", ("namespace", "run"), registry=r)
    m["cpt_reconcile_seconds"] = Histogram("cpt_reconcile_seconds", "", registry=r)
    return r, m


def healthy_run(m: dict[str, Any], ns: str, run: str, attempt: str = "1") -> None:
    """A run training normally: evaluated against its base, gated, mixing domain and replay."""
    labels = {"namespace": ns, "run": run, "attempt": attempt}
    for name, value in (("cpt_train_loss", 2.4), ("cpt_learning_rate", 3e-5), ("cpt_grad_norm", 0.9),
                        ("cpt_grad_norm_mean", 1.0), ("cpt_grad_norm_std", 0.2), ("cpt_anomaly_k", 6),
                        ("cpt_tokens_per_second", 52_000), ("cpt_mfu", 0.41), ("cpt_trainer_up", 1),
                        ("cpt_checkpoint_seconds", 12.5), ("cpt_last_checkpoint_step", 500),
                        ("cpt_last_checkpoint_timestamp_seconds", time.time() - 300),
                        ("cpt_eval_step", 500), ("cpt_eval_tokens", 2.6e8)):
        m[name].labels(**labels).set(value)
    for source, role, weight, realised, loss, dropped in (("legal", "domain", 0.8, 0.79, 2.4, 0.05),
                                                          ("web", "replay", 0.2, 0.21, 2.2, 0.1)):
        m["cpt_mixture_weight"].labels(source=source, role=role, **labels).set(weight)
        m["cpt_mixture_realised"].labels(source=source, role=role, **labels).set(realised)
        m["cpt_source_loss"].labels(source=source, role=role, **labels).set(loss)
        m["cpt_source_dropped_share"].labels(source=source, role=role, **labels).set(dropped)
    for suite, metric, value, base in (("legal", "perplexity", 8.1, 9.4), ("general", "perplexity", 12.3, 12.0),
                                       ("harmful", "refusal_rate", 0.93, 0.95)):
        m["cpt_eval_metric"].labels(suite=suite, metric=metric, **labels).set(value)
        m["cpt_eval_base_metric"].labels(suite=suite, metric=metric, **labels).set(base)
    m["cpt_gate_threshold"].labels(gate="general-regression", suite="general", metric="perplexity",
                                   **labels).set(13.2)
    m["cpt_gate_threshold"].labels(gate="refusals", suite="harmful", metric="refusal_rate",
                                   **labels).set(0.85)
    m["cpt_run_attempt"].labels(namespace=ns, run=run).set(int(attempt))
    m["cpt_run_gpus"].labels(namespace=ns, run=run).set(16)
    m["cpt_run_improved"].labels(namespace=ns, run=run).set(1)
    m["cpt_run_goodput_ratio"].labels(namespace=ns, run=run).set(0.91)
    for cause, seconds in (("productive", 9100.0), ("starting", 300.0), ("restoring", 250.0),
                           ("checkpointing", 200.0), ("lostSteps", 100.0), ("failures", 50.0)):
        m["cpt_run_time_seconds"].labels(namespace=ns, run=run, cause=cause).set(seconds)
    m["cpt_run_in_place_restarts"].labels(namespace=ns, run=run).set(1)


def incidents(m: dict[str, Any], ns: str) -> None:
    """One run per alert, each shaped like the incident its alert is about."""
    healthy_run(m, ns, "gap")           # general perplexity 12 -> 12.8 of 13.2 allowed: 67%
    m["cpt_eval_metric"].labels(suite="general", metric="perplexity", namespace=ns, run="gap", attempt="1").set(12.8)
    healthy_run(m, ns, "nan")
    m["cpt_train_loss"].labels(namespace=ns, run="nan", attempt="1").set(math.nan)
    healthy_run(m, ns, "hung")          # up, but cpt_step never moves
    m["cpt_step"].labels(namespace=ns, run="hung", attempt="1").set(40)
    healthy_run(m, ns, "stale")         # last checkpoint three hours ago
    stale = m["cpt_last_checkpoint_timestamp_seconds"].labels(namespace=ns, run="stale", attempt="1")
    stale.set(time.time() - 3 * 3600)
    m["cpt_run_gpus"].labels(namespace=ns, run="crashed").set(8)   # GPUs held, no trainer series
    m["cpt_run_attempt"].labels(namespace=ns, run="crashed").set(2)
    healthy_run(m, ns, "flat")          # trains, but nothing beats the base: the base is the choice
    m["cpt_run_improved"].labels(namespace=ns, run="flat").set(0)
    healthy_run(m, ns, "junk")          # curation drops 80% of the web source
    m["cpt_source_dropped_share"].labels(source="web", role="replay", namespace=ns, run="junk", attempt="1").set(0.8)
    healthy_run(m, ns, "slow")          # half its time goes to restarts and restores
    m["cpt_run_goodput_ratio"].labels(namespace=ns, run="slow").set(0.5)
    healthy_run(m, ns, "hard")          # the web source's loss stays at twice the legal one's
    m["cpt_source_loss"].labels(source="web", role="replay", namespace=ns, run="hard", attempt="1").set(4.8)


def train(m: dict[str, Any], ns: str, stop: threading.Event) -> None:
    """Advance the runs that are training, and keep the operator reconciling."""
    step = 500
    while not stop.wait(0.3):
        step += 1
        for run in ("r1", "gap", "nan", "stale", "flat", "junk", "hard"):
            m["cpt_step"].labels(namespace=ns, run=run, attempt="1").set(step)
            m["cpt_tokens_total"].labels(namespace=ns, run=run, attempt="1").set(step * 524_288)
        m["cpt_reconcile_seconds"].observe(0.02 + (step % 7) / 100)


def events(m: dict[str, Any], ns: str) -> None:
    """Counters that grow while Prometheus watches: rollbacks, breaches, anomalies, saves."""
    one = {"namespace": ns, "run": "r1", "attempt": "1"}
    m["cpt_rollbacks_total"].labels(namespace=ns, run="r1", target="lastGood").inc()
    m["cpt_gate_breaches_total"].labels(namespace=ns, run="r1", gate="general-regression").inc()
    m["cpt_anomalies_total"].labels(kind="grad_norm", **one).inc()
    m["cpt_anomalies_total"].labels(kind="loss_spike", **one).inc()
    m["cpt_skipped_steps_total"].labels(**one).inc()
    m["cpt_checkpoint_saves_total"].labels(**one).inc()
    m["cpt_runs"].labels(phase="Running").set(5)
    m["cpt_runs"].labels(phase="Succeeded").set(2)


@pytest.fixture(scope="module")
def exporter(prometheus: Any) -> Iterator[Exporter]:
    from prometheus_client.exposition import MetricsHandler

    ns = f"ns-{uuid.uuid4().hex[:8]}"
    registry, m = build_registry()
    healthy_run(m, ns, "r1")
    incidents(m, ns)
    m["cpt_runs"].labels(phase="Running").set(4)
    stop = threading.Event()
    trainer = threading.Thread(target=train, args=(m, ns, stop), daemon=True)
    trainer.start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    prometheus.add_target(address, {"job_kind": "cpt-dashboards"})
    try:
        prometheus.wait_for(f'cpt_step{{namespace="{ns}", run="r1"}}', timeout=30)
        # Counters grow only once Prometheus has seen them at their earlier value.
        prometheus.wait_for(f'count_over_time(cpt_run_gpus{{namespace="{ns}"}}[1m]) > 2', timeout=30)
        events(m, ns)
        prometheus.wait_for(f'cpt_rollbacks_total{{namespace="{ns}"}}', timeout=30)
        time.sleep(2)  # one more scrape, so rates over the counters have two points after the change
        yield Exporter(ns, registry, m, stop)
    finally:
        stop.set()
        prometheus.remove_target(address)
        server.shutdown()


def dashboard_cases() -> list[Any]:
    return [pytest.param(path, q, id=q.where)
            for path in chartlib.DASHBOARDS for q in chartlib.dashboard_queries(path)]


def concrete(expr: str, ns: str) -> str:
    # A repeated panel gets one suite each; everywhere else the suite variable is "All" (.*).
    expr = expr.replace('suite="$suite"', 'suite="general"')
    return chartlib.substitute(expr, {"datasource": "prom", "namespace": ns, "run": "r1",
                                      "attempt": "1", "suite": ".*"})


@pytest.mark.parametrize("path, query", dashboard_cases())
def test_dashboard_query_returns_data(prometheus: Any, exporter: Exporter, path: Path, query: Any) -> None:
    expr = concrete(query.expr, exporter.namespace)
    result = prometheus.query(expr)
    assert result, f"no data for {query.where}:\n{expr}"


@pytest.fixture(scope="module")
def alert_rules(prometheus: Any, exporter: Exporter) -> Iterator[None]:
    path = prometheus.add_rules(f"cpt-operator-{exporter.namespace}", chartlib.RULES.read_text())
    try:
        yield
    finally:
        path.unlink()
        prometheus.reload()


@pytest.mark.parametrize("alert, run", [
    ("CptStabilityGapOpening", "gap"),
    ("CptGateBreached", "r1"),
    ("CptLossSpike", "r1"),
    ("CptNonFiniteLoss", "nan"),
    ("CptTrainingStalled", "hung"),
    ("CptCheckpointTooOld", "stale"),
    ("CptTrainerDown", "crashed"),
    ("CptRunNoImprovement", "flat"),
    ("CptSourceMostlyDropped", "junk"),
    ("CptSourceLossHigh", "hard"),
    ("CptGoodputLow", "slow"),
])
def test_alert_goes_off_on_its_incident_and_only_there(prometheus: Any, exporter: Exporter,
                                                       alert_rules: None, alert: str, run: str) -> None:
    ns = exporter.namespace
    selector = f'ALERTS{{alertname="{alert}", namespace="{ns}"}}'
    found = prometheus.wait_for(selector, timeout=30)
    assert {a["metric"]["run"] for a in found} == {run}, found
    assert found[0]["metric"]["alertstate"] in {"pending", "firing"}
