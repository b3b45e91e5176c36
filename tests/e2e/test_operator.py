"""The operator against the real control plane, Prometheus and S3 of tests/cluster.

The operator runs as its own process (`python -m cpt_operator.kube`), exactly as in the chart's
Deployment, with a one-second reconcile interval. Pods are simulated by kwok (nothing runs in
them), so the trainer's side is played by the test: it serves the trainer's metric series with
prometheus_client for the real Prometheus to scrape, and writes checkpoint manifests into the
real S3 bucket.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from cpt_api.alerts import ACTION_GATE, ACTION_LABEL
from cpt_api.manifest import FileEntry, Lineage, Manifest
from tests.e2e.operator_harness import (TOKEN, OperatorProcess, condition, events, get_run, install_crd,
                                        job_names, running_operator, status_of, trainer_config)

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.timeout(180)]

GOOD = "attempt-001/step-00000010"


@pytest.fixture(scope="module")
def crd(kube_cluster: Any) -> None:
    install_crd(kube_cluster)


@pytest.fixture(scope="module")
def operator(kube_cluster: Any, crd: None, prometheus: Any, s3_server: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    yield from running_operator(kube_cluster, prometheus, s3_server,
                                tmp_path_factory.mktemp("operator") / "operator.log")


def cptrun(name: str, bucket: str, *, nodes: int = 1, gpus: int = 1, **spec: Any) -> dict[str, Any]:
    doc = {
        "baseModel": {"uri": f"s3://{bucket}/models/base", "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"s3://{bucket}/data/legal/*.jsonl", "weight": 0.8},
            {"name": "web", "role": "replay", "uri": f"s3://{bucket}/data/web/*.jsonl", "weight": 0.2}]},
        "budget": {"steps": 100}, "schedule": {"warmupSteps": 5},
        "checkpoint": {"uri": f"s3://{bucket}/runs/{name}", "every": 10},
        "evaluation": {"every": 10, "suites": [
            {"name": "legal", "kind": "domain", "uri": f"s3://{bucket}/eval/legal.jsonl"},
            {"name": "general", "kind": "general", "uri": f"s3://{bucket}/eval/general.jsonl"}]},
        "gates": [{"name": "general-regression", "suite": "general", "threshold": 0.1,
                   "action": "rollback", "rollbackTo": "lastGood", "tune": {"lrFactor": 0.5, "replayDelta": 0.1}}],
        "resources": {"nodes": nodes, "gpusPerNode": gpus, "nodeSelector": {"pool": "h100"}},
    } | spec
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": name}, "spec": doc}


def write_checkpoint(s3: Any, bucket: str, run: str, attempt: int, step: int, evals: dict[str, float]) -> str:
    """A checkpoint as the trainer commits it: state files first, the manifest last."""
    fs = s3.filesystem()
    name = f"attempt-{attempt:03d}/step-{step:08d}"
    root = f"{bucket}/runs/{run}/{name}"
    payload = os.urandom(2048)
    with fs.open(f"{root}/model.safetensors", "wb") as f:
        f.write(payload)
    import hashlib

    manifest = Manifest(step=step, tokens=step * 4096, created_at="2026-11-23T12:00:00Z",
                        lineage=Lineage(run=run, attempt=attempt, parent=None, base_uri=f"s3://{bucket}/models/base",
                                        restore_mode="weightsOnly", data_version="d1", tokenizer_hash="t1",
                                        config_hash="c1"),
                        files={"model.safetensors": FileEntry(size=len(payload),
                                                              sha256=hashlib.sha256(payload).hexdigest())},
                        evals=evals)
    with fs.open(f"{root}/manifest.json", "w") as f:
        f.write(manifest.model_dump_json(by_alias=True))
    return name


class TrainerMetrics:
    """Rank 0's exporter as the trainer runs it, for one attempt, scraped by the real Prometheus."""

    def __init__(self, prometheus: Any, run: str, namespace: str, attempt: int, pod_namespace: str | None = None):
        from prometheus_client import CollectorRegistry, Gauge
        from prometheus_client.exposition import MetricsHandler

        self.registry = CollectorRegistry()
        labels = {"run": run, "namespace": namespace, "attempt": str(attempt)}
        self.labels = labels
        g = lambda name, extra=(): Gauge(name, name, [*labels, *extra], registry=self.registry)  # noqa: E731
        self.metric = g("cpt_eval_metric", ("suite", "metric"))
        self.base = g("cpt_eval_base_metric", ("suite", "metric"))
        self.step, self.tokens, self.train_step = g("cpt_eval_step"), g("cpt_eval_tokens"), g("cpt_step")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(self.registry))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.prometheus = prometheus
        # the namespace target label is the pod's own, as the chart's PodMonitor (honorLabels:
        # false) sets it: it wins over whatever namespace the exporter claims
        prometheus.add_target(self.address, {"job_kind": "trainer", "namespace": pod_namespace or namespace})

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.step.labels(**self.labels).set(step)
        self.tokens.labels(**self.labels).set(step * 4096)
        self.train_step.labels(**self.labels).set(step)
        for key, value in metrics.items():
            suite, metric = key.split(".")
            self.metric.labels(**self.labels, suite=suite, metric=metric).set(value)

    def set_base(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            suite, metric = key.split(".")
            self.base.labels(**self.labels, suite=suite, metric=metric).set(value)

    def close(self) -> None:
        self.prometheus.remove_target(self.address)
        self.server.shutdown()


BASE = {"general.perplexity": 10.0, "legal.perplexity": 30.0}


def start_with_a_good_checkpoint(kube: Any, prometheus: Any, s3_server: Any, namespace: str, bucket: str,
                                 run: str) -> TrainerMetrics:
    """Attempt 1 running, its trainer exporting the base evaluation and a good one at step 10,
    whose checkpoint is in the bucket: the run has a last good checkpoint to return to."""
    kube.apply(cptrun(run, bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, run) == [f"{run}-a1"], f"job {run}-a1", timeout=30)
    write_checkpoint(s3_server, bucket, run, 1, 10, {"general.perplexity": 10.2, "legal.perplexity": 25.0})
    trainer = TrainerMetrics(prometheus, run, namespace, 1)
    trainer.set_base(BASE)
    trainer.evaluated(10, {"general.perplexity": 10.2, "legal.perplexity": 25.0})
    kube.wait_for(lambda: status_of(kube, namespace, run).get("lastGoodCheckpoint") == GOOD,
                  "last good checkpoint in status", timeout=30)
    assert status_of(kube, namespace, run)["phase"] == "Running"
    return trainer


# -- tests -----------------------------------------------------------------------------------
def test_a_cptrun_becomes_an_indexed_job_on_the_gpu_pool_and_succeeds(kube_cluster: Any, operator: OperatorProcess,
                                                                         namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("legal", s3_bucket, nodes=2, gpus=4), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "legal") == ["legal-a1"], "job legal-a1", timeout=30)
    run = get_run(kube, namespace, "legal")
    owner = {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "name": "legal",
             "uid": run["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    service = kube.kubectl_json("get", "service", "legal-a1", "-n", namespace)
    job = kube.kubectl_json("get", "job", "legal-a1", "-n", namespace)
    config = trainer_config(kube, namespace, "legal-a1")
    for obj in (service, job, kube.kubectl_json("get", "configmap", "legal-a1", "-n", namespace)):
        assert obj["metadata"]["ownerReferences"] == [owner]
    assert service["spec"]["clusterIP"] == "None"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert args[args.index("--rdzv-endpoint") + 1] == "legal-a1-0.legal-a1:29500"
    assert args[args.index("--nnodes") + 1] == "2" and args[args.index("--nproc-per-node") + 1] == "4"
    assert config["attempt"] == 1 and "restoreFrom" not in config
    assert config["checkpointUri"] == f"s3://{s3_bucket}/runs/legal/attempt-001"

    def running_pods() -> list[dict[str, Any]] | None:
        pods = [p for p in kube.pods(namespace, "cpt.mlops.dev/run=legal") if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    pods = kube.wait_for(running_pods, "2 trainer pods running", timeout=30)
    assert {p["spec"]["nodeName"] for p in pods} <= {"gpu-h100-0", "gpu-h100-1"}
    # the Job controller gives each pod its index and the stable hostname the rendezvous uses
    assert sorted(p["spec"]["hostname"] for p in pods) == ["legal-a1-0", "legal-a1-1"]
    assert all(p["spec"]["subdomain"] == "legal-a1" for p in pods)
    status = status_of(kube, namespace, "legal")
    assert status["phase"] == "Running" and status["attempt"] == 1 and status["observedGeneration"] == 1
    assert condition(status, "Progressing")["status"] == "True"
    assert 'cpt_run_gpus{namespace="%s",run="legal"} 8.0' % namespace in operator.metrics()

    # the trainers finish their budget: the Job completes and the run succeeds
    kube.annotate_pods(namespace, "cpt.mlops.dev/run=legal", "cpt-test/complete=true")
    kube.wait_for(lambda: status_of(kube, namespace, "legal").get("phase") == "Succeeded", "run Succeeded", timeout=30)
    status = status_of(kube, namespace, "legal")
    assert condition(status, "Succeeded")["status"] == "True" and condition(status, "Ready")["status"] == "True"
    reasons = {e["reason"] for e in events(kube, namespace, "legal")}
    assert {"AttemptStarted", "Completed"} <= reasons


@pytest.mark.parametrize("change, message", [
    ({"schedule": {"warmupSteps": 100}}, "schedule.warmupSteps must be below budget.steps"),
    ({"optimizer": {"lr": -1}}, "spec.optimizer.lr"),
    ({"gates": [{"name": "g", "suite": "nope", "threshold": 0.1}]}, "every gate must read a suite"),
    ({"stopPolicy": {"plateau": {"suite": "legl"}}}, "stopPolicy.plateau.suite must name a suite"),
    ({"evaluation": {"suites": [{"name": "x", "kind": "general"}]}}, "uri is required"),
    ({"evaluation": {"suites": [{"name": "x", "kind": "general", "uri": "s3://b/he.jsonl", "metric": "pass_at_1"}]}},
     "and those need `code`"),
    ({"evaluation": {"suites": [{"name": "x", "kind": "general", "metric": "pass_at_k",
                                 "code": {"problems": "humaneval", "samples": 5, "k": 10}}]}},
     "code.k must not exceed code.samples"),
    ({"resources": {"nodes": 0}}, "spec.resources.nodes"),
    ({"baseModel": {"uri": "http://169.254.169.254/latest/meta-data/"}}, "spec.baseModel.uri"),
], ids=["warmup not below the budget (CEL)", "a negative learning rate (schema)",
        "a gate on an undefined suite (CEL)", "a plateau on a misspelt suite (CEL)",
        "a suite with neither texts nor a benchmark (CEL)", "pass@1 without programs to run (CEL)",
        "pass@10 from 5 samples (CEL)",
        "zero nodes (schema)",
        "a base over http (schema)"])
def test_invalid_manifests_are_rejected_by_the_api_server(kube_cluster: Any, crd: None, namespace: str,
                                                          change: dict[str, Any], message: str) -> None:
    bad = cptrun("bad", "bucket")
    bad["spec"] |= change
    result = kube_cluster.kubectl_result("apply", "-n", namespace, "-f", "-", input=json.dumps(bad))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_spec_the_cluster_cannot_run_is_reported_in_status(kube_cluster: Any, operator: OperatorProcess,
                                                             namespace: str) -> None:
    doc = cptrun("nowhere", "bucket")
    del doc["spec"]["checkpoint"]  # valid for a local run, impossible on a cluster
    kube_cluster.apply(doc, namespace=namespace)

    def invalid() -> dict[str, Any] | None:
        cond = condition(status_of(kube_cluster, namespace, "nowhere"), "SpecValid")
        return cond if cond.get("status") == "False" else None

    cond = kube_cluster.wait_for(invalid, "SpecValid=False", timeout=30)
    assert cond["reason"] == "InvalidSpec" and "checkpoint.uri is required" in cond["message"]
    assert job_names(kube_cluster, namespace, "nowhere") == []
    assert "InvalidSpec" in {e["reason"] for e in events(kube_cluster, namespace, "nowhere")}


def test_a_gate_breach_in_prometheus_rolls_back_to_the_last_good_checkpoint(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any,
        namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    trainer = start_with_a_good_checkpoint(kube, prometheus, s3_server, namespace, s3_bucket, "gated")
    try:
        # general perplexity 30% above the base's: the gate allows 10%
        trainer.evaluated(20, {"general.perplexity": 13.0, "legal.perplexity": 22.0})
        kube.wait_for(lambda: job_names(kube, namespace, "gated") == ["gated-a2"], "attempt 2 replaces attempt 1",
                      timeout=30)
    finally:
        trainer.close()
    config = trainer_config(kube, namespace, "gated-a2")
    assert config["restoreFrom"] == f"s3://{s3_bucket}/runs/gated/{GOOD}"
    assert config["restoreMode"] == "fullState"
    # the tuned attempt warms its LR up again from the restored step
    assert config["overrides"] == {"lrScale": 0.5, "replayDelta": 0.1, "skips": [], "rewarmFrom": 10}
    status = status_of(kube, namespace, "gated")
    assert status["attempt"] == 2 and status["rollbacks"] == 1 and status["restoreFrom"] == GOOD
    record = status["history"][0]
    assert (record["gate"], record["metric"], record["target"]) == ("general-regression", "general.perplexity", GOOD)
    assert record["value"] == pytest.approx(13.0) and record["baseline"] == pytest.approx(10.0)
    assert condition(status, "GateBreached")["status"] == "True"
    assert status["baseMetrics"] == BASE
    assert {"RollingBack", "AttemptStarted"} <= {e["reason"] for e in events(kube, namespace, "gated")}
    metrics = operator.metrics()
    assert f'cpt_gate_breaches_total{{gate="general-regression",namespace="{namespace}",run="gated"}} 1.0' in metrics
    assert f'cpt_rollbacks_total{{namespace="{namespace}",run="gated",target="{GOOD}"}} 1.0' in metrics


def test_a_gate_on_a_benchmark_accuracy_rolls_back_when_it_drops(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any,
        namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    suites = [{"name": "legal", "kind": "domain", "uri": f"s3://{s3_bucket}/eval/legal.jsonl"},
              {"name": "mmlu", "kind": "general", "metric": "acc",
               "benchmark": {"tasks": ["mmlu_college_biology"], "numFewshot": 5, "limit": 100}}]
    gate = {"name": "mmlu-drop", "suite": "mmlu", "threshold": 0.03, "relative": False,
            "action": "rollback", "rollbackTo": "lastGood", "tune": {"lrFactor": 0.5, "replayDelta": 0.1}}
    kube.apply(cptrun("bench", s3_bucket, evaluation={"every": 10, "suites": suites}, gates=[gate]),
               namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "bench") == ["bench-a1"], "job bench-a1", timeout=30)
    good = {"legal.perplexity": 25.0, "mmlu.acc": 0.46, "mmlu.acc_stderr": 0.05}
    write_checkpoint(s3_server, s3_bucket, "bench", 1, 10, good)
    trainer = TrainerMetrics(prometheus, "bench", namespace, 1)
    try:
        trainer.set_base({"legal.perplexity": 30.0, "mmlu.acc": 0.47, "mmlu.acc_stderr": 0.05})
        trainer.evaluated(10, good)
        kube.wait_for(lambda: status_of(kube, namespace, "bench").get("lastGoodCheckpoint") == GOOD,
                      "last good checkpoint in status", timeout=30)
        # accuracy 0.47 -> 0.41: 6 points down, the gate allows 3
        trainer.evaluated(20, {"legal.perplexity": 22.0, "mmlu.acc": 0.41, "mmlu.acc_stderr": 0.05})
        kube.wait_for(lambda: job_names(kube, namespace, "bench") == ["bench-a2"], "attempt 2 replaces attempt 1",
                      timeout=30)
    finally:
        trainer.close()
    status = status_of(kube, namespace, "bench")
    record = status["history"][0]
    assert (record["gate"], record["metric"], record["target"]) == ("mmlu-drop", "mmlu.acc", GOOD)
    assert record["value"] == pytest.approx(0.41) and record["baseline"] == pytest.approx(0.47)
    assert trainer_config(kube, namespace, "bench-a2")["restoreFrom"].endswith(GOOD)


def test_a_run_whose_domain_got_worse_ends_with_the_base_chosen_and_says_so(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any,
        namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("worse", s3_bucket, stopPolicy={"noImprovement": {"evals": 1}}), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "worse") == ["worse-a1"], "job worse-a1", timeout=30)
    # legal perplexity 30 -> 33: the domain got worse; general held within its gate
    evals = {"general.perplexity": 10.1, "legal.perplexity": 33.0}
    write_checkpoint(s3_server, s3_bucket, "worse", 1, 10, evals)
    trainer = TrainerMetrics(prometheus, "worse", namespace, 1)
    try:
        trainer.set_base(BASE)
        kube.wait_for(lambda: status_of(kube, namespace, "worse").get("lastCheckpoint") == GOOD,
                      "the checkpoint in status", timeout=30)
        trainer.evaluated(10, evals)
        kube.wait_for(lambda: status_of(kube, namespace, "worse").get("phase") == "Succeeded",
                      "run Succeeded by stopPolicy.noImprovement", timeout=30)
    finally:
        trainer.close()
    status = status_of(kube, namespace, "worse")
    assert status["bestCheckpoint"] == "base" and "none is chosen (bestCheckpoint: base)" in status["message"]
    assert "no improvement: the domain gained at most" in status["message"]
    improved = condition(status, "Improved")
    assert (improved["status"], improved["reason"]) == ("False", "NoImprovement")
    assert f"closest {GOOD}: domain -10.00% over the base after 40,960 tokens" in improved["message"]
    warning = next(e for e in events(kube, namespace, "worse") if e["reason"] == "NoImprovement")
    assert warning["type"] == "Warning" and GOOD in warning["message"]
    assert f'cpt_run_improved{{namespace="{namespace}",run="worse"}} 0.0' in operator.metrics()


def test_a_pod_in_another_namespace_cannot_report_for_a_run(prometheus: Any) -> None:
    """Series a pod labels with another namespace land under its own (the PodMonitor's target
    label, honorLabels false), so the operator never reads them as the other run's evaluations."""
    from cpt_operator.kube.prometheus import PrometheusReader

    reader = PrometheusReader(prometheus.url)
    intruder = TrainerMetrics(prometheus, "victim", "team-a", 1, pod_namespace="team-b")
    honest = TrainerMetrics(prometheus, "honest", "team-a", 1)
    try:
        intruder.evaluated(20, {"general.perplexity": 99.0})
        honest.evaluated(20, {"general.perplexity": 11.0})
        prometheus.wait_for('cpt_eval_metric{run="honest"}')
        prometheus.wait_for('cpt_eval_metric{run="victim"}')
        assert reader.read("victim", "team-a", 1, 120).points == []
        (claimed,) = reader.read("victim", "team-b", 1, 120).points  # its own namespace's view
        assert claimed.metrics == {"general.perplexity": 99.0}
        (own,) = reader.read("honest", "team-a", 1, 120).points
        assert own.metrics == {"general.perplexity": 11.0}
    finally:
        intruder.close()
        honest.close()


def test_an_alert_through_the_webhook_takes_the_same_rollback_path(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any, namespace: str,
        s3_bucket: str) -> None:
    """Only an alert meant as an action acts, once, and only with a gate the run defines."""
    kube = kube_cluster
    trainer = start_with_a_good_checkpoint(kube, prometheus, s3_server, namespace, s3_bucket, "alerted")
    trainer.close()
    labels = {"alertname": "CptGeneralRegression", "run": "alerted", "namespace": namespace,
              "gate": "general-regression"}
    began = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())  # fired during attempt 1

    def firing(**extra: str) -> dict[str, Any]:
        return {"status": "firing", "alerts": [{"status": "firing", "fingerprint": "5eed", "startsAt": began,
                                                "labels": {**labels, **extra}}]}

    alert = firing(**{ACTION_LABEL: ACTION_GATE})
    assert operator.post_alert(alert, token="wrong")[0] == 401
    # the chart's report of a breach is for people: ignored, and said so
    code, body = operator.post_alert(firing(alertname="CptGateBreached", severity="critical"))
    assert code == 200 and body["ignored"][0]["reason"] == "NotAnAction" and not body["recorded"]
    code, body = operator.post_alert(firing(**{ACTION_LABEL: ACTION_GATE, "gate": "GeneralPerplexityHigh"}))
    assert code == 422 and "its gates: general-regression" in body["refused"][0]["detail"]
    time.sleep(3)  # three passes: none of these may act
    assert status_of(kube, namespace, "alerted").get("rollbacks", 0) == 0
    assert job_names(kube, namespace, "alerted") == ["alerted-a1"]
    code, body = operator.post_alert(alert)
    assert code == 202 and body["recorded"][0]["run"] == "alerted"
    assert operator.post_alert(alert)[1]["ignored"][0]["reason"] in {"Duplicate", "NotRunning"}  # a second replica
    kube.wait_for(lambda: job_names(kube, namespace, "alerted") == ["alerted-a2"], "attempt 2 after the alert",
                  timeout=30)
    assert trainer_config(kube, namespace, "alerted-a2")["restoreFrom"].endswith(GOOD)
    # Alertmanager repeats the firing alert (repeat_interval, a restart) while attempt 2 runs
    kube.wait_for(lambda: status_of(kube, namespace, "alerted").get("phase") == "Running", "attempt 2 running",
                  timeout=30)
    for repeat in (alert, firing(**{ACTION_LABEL: ACTION_GATE, "attempt": "1"})):
        code, body = operator.post_alert(repeat)
        assert code == 200 and body["ignored"][0]["reason"] in {"AttemptEnded", "Duplicate"}, body
    time.sleep(3)
    run = get_run(kube, namespace, "alerted")
    assert job_names(kube, namespace, "alerted") == ["alerted-a2"] and run["status"]["rollbacks"] == 1
    assert "cpt.mlops.dev/gate-alert" not in (run["metadata"].get("annotations") or {})
    assert [r["gate"] for r in run["status"]["history"]] == ["general-regression"]
    assert run["status"]["handledAlerts"] == [f"5eed@{began}"]


def test_an_operator_restart_mid_run_and_mid_rollback_creates_nothing_twice(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("steady", s3_bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "steady") == ["steady-a1"], "job steady-a1", timeout=30)
    uid = kube.kubectl_json("get", "job", "steady-a1", "-n", namespace)["metadata"]["uid"]
    before = status_of(kube, namespace, "steady")

    operator.stop(signal.SIGKILL)  # no goodbye: as if the node running it vanished
    operator.start()
    time.sleep(4)  # a few passes at one per second
    assert job_names(kube, namespace, "steady") == ["steady-a1"]
    assert kube.kubectl_json("get", "job", "steady-a1", "-n", namespace)["metadata"]["uid"] == uid
    after = status_of(kube, namespace, "steady")
    assert (after["phase"], after["attempt"], after["restarts"]) == (before["phase"], 1, 0)

    # killed after recording a rollback but before deleting the Job: the next operator finishes it
    operator.stop(signal.SIGKILL)
    patch = {"status": {"phase": "RollingBack", "rollbacks": 1, "restoreFrom": None,
                        "history": [{"attempt": 1, "gate": "manual", "target": "base"}]}}
    kube.kubectl("patch", "cptrun", "steady", "-n", namespace, "--subresource=status", "--type=merge",
                 "-p", json.dumps(patch))
    operator.start()
    kube.wait_for(lambda: job_names(kube, namespace, "steady") == ["steady-a2"], "attempt 2 after the restart",
                  timeout=30)
    time.sleep(3)
    assert job_names(kube, namespace, "steady") == ["steady-a2"]
    status = status_of(kube, namespace, "steady")
    assert (status["phase"], status["attempt"], status["rollbacks"], len(status["history"])) == ("Running", 2, 1, 1)
    assert "restoreFrom" not in trainer_config(kube, namespace, "steady-a2")


def test_deleting_a_cptrun_stops_its_job_and_keeps_its_checkpoints(
        kube_cluster: Any, operator: OperatorProcess, s3_server: Any, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("doomed", s3_bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "doomed") == ["doomed-a1"], "job doomed-a1", timeout=30)
    name = write_checkpoint(s3_server, s3_bucket, "doomed", 1, 10, {"general.perplexity": 10.0})
    assert "cpt.mlops.dev/finalizer" in get_run(kube, namespace, "doomed")["metadata"]["finalizers"]
    kube.kubectl("delete", "cptrun", "doomed", "-n", namespace, "--timeout=30s")
    assert kube.kubectl_result("get", "cptrun", "doomed", "-n", namespace).returncode != 0
    kube.wait_for(lambda: not job_names(kube, namespace, "doomed"), "job deleted", timeout=30)
    fs = s3_server.filesystem()
    assert fs.exists(f"{s3_bucket}/runs/doomed/{name}/manifest.json")
    assert fs.exists(f"{s3_bucket}/runs/doomed/{name}/model.safetensors")


def test_cptctl_steers_a_run_on_the_cluster(kube_cluster: Any, operator: OperatorProcess, s3_server: Any,
                                           namespace: str, s3_bucket: str, tmp_path: Path) -> None:
    kube = kube_cluster
    kube.apply(cptrun("steered", s3_bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "steered") == ["steered-a1"], "job steered-a1", timeout=30)
    write_checkpoint(s3_server, s3_bucket, "steered", 1, 10, {"general.perplexity": 10.0})
    kube.wait_for(lambda: status_of(kube, namespace, "steered").get("lastCheckpoint") == GOOD,
                  "checkpoint listed in status", timeout=30)

    def cptctl(*args: str) -> subprocess.CompletedProcess[str]:
        # run from an empty directory: no local run directory can shadow the cluster's run
        return subprocess.run([sys.executable, "-m", "cpt_operator.cli", *args, "-n", namespace,
                               "--kubeconfig", str(kube.kubeconfig)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)

    assert cptctl("rollback", "steered", "--to", GOOD).returncode == 0
    kube.wait_for(lambda: job_names(kube, namespace, "steered") == ["steered-a2"], "attempt 2 after cptctl rollback",
                  timeout=30)
    assert trainer_config(kube, namespace, "steered-a2")["restoreFrom"].endswith(GOOD)
    assert status_of(kube, namespace, "steered")["history"][0]["gate"] == "manual"

    assert cptctl("stop", "steered").returncode == 0
    kube.wait_for(lambda: status_of(kube, namespace, "steered").get("phase") == "Stopped", "run Stopped", timeout=30)
    kube.wait_for(lambda: not job_names(kube, namespace, "steered"), "job deleted after stop", timeout=30)
    shown = cptctl("status", "steered")
    assert shown.returncode == 0 and "phase:       Stopped" in shown.stdout
    assert "rollbacks:   1" in shown.stdout
    missing = cptctl("status", "no-such-run")
    assert missing.returncode == 2 and "no CptRun 'no-such-run'" in missing.stderr


def test_failed_pods_restart_from_the_last_checkpoint_a_bounded_number_of_times(
        kube_cluster: Any, operator: OperatorProcess, s3_server: Any, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("flaky", s3_bucket, stopPolicy={"maxAttemptRestarts": 1}), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "flaky") == ["flaky-a1"], "job flaky-a1", timeout=30)
    kube.wait_for(lambda: [p for p in kube.pods(namespace, "cpt.mlops.dev/attempt=1")
                           if p["status"].get("phase") == "Running"], "pod of attempt 1 running", timeout=30)
    name = write_checkpoint(s3_server, s3_bucket, "flaky", 1, 10, {"general.perplexity": 10.0})
    kube.wait_for(lambda: status_of(kube, namespace, "flaky").get("lastCheckpoint") == name,
                  "checkpoint listed in status", timeout=30)

    kube.annotate_pods(namespace, "cpt.mlops.dev/attempt=1", "cpt-test/fail=true")  # the node died mid-step
    kube.wait_for(lambda: "flaky-a2" in job_names(kube, namespace, "flaky"), "attempt 2 after the failure", timeout=30)
    assert trainer_config(kube, namespace, "flaky-a2")["restoreFrom"].endswith(name)
    status = status_of(kube, namespace, "flaky")
    assert (status["attempt"], status["restarts"], status["rollbacks"]) == (2, 1, 0)
    assert condition(status, "Degraded")["reason"] == "AttemptFailed"
    assert "exited with code 1" in condition(status, "Degraded")["message"]

    kube.wait_for(lambda: [p for p in kube.pods(namespace, "cpt.mlops.dev/attempt=2")
                           if p["status"].get("phase") == "Running"], "pod of attempt 2 running", timeout=30)
    kube.annotate_pods(namespace, "cpt.mlops.dev/attempt=2", "cpt-test/fail=true")
    kube.wait_for(lambda: status_of(kube, namespace, "flaky").get("phase") == "Failed", "run Failed", timeout=30)
    status = status_of(kube, namespace, "flaky")
    assert status["attempt"] == 2 and "1 restarts used of 1" in status["message"]
    assert condition(status, "Failed")["status"] == "True"


def test_a_prometheus_alert_rule_rolls_back_through_alertmanager_and_the_webhook(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any, namespace: str,
        s3_bucket: str, tmp_path: Path) -> None:
    """The whole alerting path with real servers: a rule in Prometheus fires, Alertmanager posts
    to the operator's webhook with the bearer token, the operator rolls the run back."""
    components = sys.modules[type(kube_cluster).__module__]  # tests/cluster/cluster.py, as conftest loaded it
    Alertmanager, Prometheus, running = components.Alertmanager, components.Prometheus, components.running
    receiver = {"name": "cpt-operator", "webhook_configs": [{
        "url": f"http://127.0.0.1:{operator.port('CPT_WEBHOOK_PORT')}/alerts", "send_resolved": False,
        "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}}}]}
    kube = kube_cluster
    trainer = start_with_a_good_checkpoint(kube, prometheus, s3_server, namespace, s3_bucket, "ruled")
    try:
        with running(Alertmanager(tmp_path / "am", receivers=[receiver])) as am, \
                running(Prometheus(tmp_path / "prom", alertmanager_url=am.url)) as rules_prom:
            rules_prom.add_target(trainer.address)
            rules_prom.add_rules("cpt", f"""
groups:
- name: cpt
  rules:
  - alert: CptGeneralPerplexityHigh
    expr: cpt_eval_metric{{suite="general",namespace="{namespace}"}} > 12
    labels: {{gate: general-regression, {ACTION_LABEL}: {ACTION_GATE}}}
  # informational, firing later: Alertmanager then re-sends the group, the acting alert with it
  - alert: CptGeneralPerplexityStillHigh
    expr: cpt_eval_metric{{suite="general",namespace="{namespace}"}} > 12
    for: 10s
    labels: {{gate: general-regression, severity: warning}}
""")
            trainer.evaluated(20, {"general.perplexity": 12.5, "legal.perplexity": 24.0})  # +25%
            kube.wait_for(lambda: job_names(kube, namespace, "ruled") == ["ruled-a2"], "attempt 2 after the alert",
                          timeout=45)
            kube.wait_for(lambda: {a["labels"]["alertname"] for a in am.alerts()} >= {"CptGeneralPerplexityStillHigh"},
                          "the informational alert firing", timeout=45)
            time.sleep(5)  # Alertmanager's group_interval is 1s: the group (both alerts) was sent again
            assert job_names(kube, namespace, "ruled") == ["ruled-a2"]
            assert status_of(kube, namespace, "ruled")["rollbacks"] == 1
    finally:
        trainer.close()
    status = status_of(kube, namespace, "ruled")
    assert status["history"][0]["gate"] == "general-regression" and status["restoreFrom"] == GOOD
    assert trainer_config(kube, namespace, "ruled-a2")["overrides"] == {"lrScale": 0.5, "replayDelta": 0.1, "skips": [],
                                                                        "rewarmFrom": 10}
