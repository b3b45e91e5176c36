"""Evaluations that Prometheus never scraped still reach the gates: the real trainer evaluates
every step while a real Prometheus scrapes it far less often, and the operator's observation
(Prometheus reader, point cache, the trainers' records, manifests) feeds `reconcile`.

The gate is on drift from the base (KL to base, 0 for the base itself, positive after any
update), absolute and tight, so every evaluation after step 0 breaches; it fires only after as
many breaches in a row as the run has evaluations, which the scrapes alone cannot show."""
from __future__ import annotations

import time

import pytest

from cpt_api import CptRunSpec, CptRunStatus, Phase
from cpt_operator.kube.observe import PointCache, observed
from cpt_operator.kube.prometheus import PrometheusReader
from cpt_operator.reconcile import AttemptState, reconcile
from cpt_operator.records import RunRecords
from cpt_api.store import list_checkpoints
from tests.cluster import cluster
from tests.integration.harness import events, log_tail, of, start, tiny_spec, wait_for, write_config

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 6


def test_an_evaluation_between_scrapes_still_trips_the_gate(tmp_path, tiny_model_dir, corpora):
    cluster.ensure_binaries(["prometheus"])
    prometheus = cluster.Prometheus(tmp_path / "prometheus", scrape_interval="15s").start()
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": STEPS}, evaluation={
        "every": 1, "suites": [{"name": "drift", "kind": "drift", "metric": "kl_to_base", "format": "text",
                                "uri": f"{corpora['domain']}/*.txt", "maxSamples": 2}]},
        gates=[{"name": "drift", "suite": "drift", "baseline": "base", "threshold": 1e-6,
                "relative": False, "consecutive": STEPS}])
    config = write_config(tmp_path, spec, attempt=1, name="scraped")
    began = time.time()
    proc = start(config)
    try:
        port = config.parent / "metrics-port"
        wait_for(port.exists, 120, "the trainer's metrics endpoint")
        prometheus.add_target(f"127.0.0.1:{port.read_text().strip()}")
        assert proc.wait(timeout=240) == 0, log_tail(config)
        evaluated = [e for e in of("evaluated", events(config)) if not e.is_base]
        assert len(evaluated) == STEPS
        series = PrometheusReader(prometheus.url).read("scraped", "local", 1,
                                                       int(time.time() - began) + 60)
    finally:
        prometheus.stop()
        if proc.poll() is None:
            proc.kill()
    scraped = PointCache().update(series.points, time.time())
    assert len([p for p in scraped if p.step > 0]) < STEPS, "every evaluation was scraped: no test"

    root = str(tmp_path / "checkpoints")
    refs, _ = list_checkpoints(root)
    status = CptRunStatus(phase=Phase.running, attempt=1)
    done = AttemptState(number=1, state="succeeded", step=STEPS)
    blind = observed(body={"metadata": {"name": "scraped"}}, attempt=done, series=series, points=scraped,
                     refs=refs)
    assert reconcile(CptRunSpec.model_validate(spec), status, blind).status.phase != Phase.rolling_back
    obs = observed(body={"metadata": {"name": "scraped"}}, attempt=done, series=series, points=scraped,
                   refs=refs, records=RunRecords(root).read())
    assert sorted(p.step for p in obs.points if p.step > 0) == list(range(1, STEPS + 1))
    plan = reconcile(CptRunSpec.model_validate(spec), status, obs)
    assert plan.status.phase == Phase.rolling_back, plan.status.message
    assert plan.status.history[0].gate == "drift"

