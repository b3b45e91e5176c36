"""Two operator replicas with kopf peering against the real control plane: the chart promises that
`operator.replicas: 2` is safe, so each replica here gets exactly the environment the chart's
Deployment gives its pod (rendered with helm), its peering object is the one the chart creates, and
the CRDs are the chart's.

Only one replica may act on CptRuns while both are alive, and when it dies without saying goodbye
(SIGKILL: no keep-alive withdrawal) the standby must take over within the peering lifetime.
Which replica acts is read from each process's own reconcile counter: a paused replica never runs
a reconcile pass.
"""
from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cpt_operator.kube.settings import Settings
from tests.e2e.operator_harness import TOKEN, OperatorProcess, free_port, job_names, status_of
from tests.helm import chartlib

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.helm,
              pytest.mark.timeout(150)]

LIFETIME_S = 10
"""The chart's operator.peering.lifetime for this test: the longest a crashed leader goes
unnoticed (60 s by default would dominate the test's runtime)."""
RELEASE, RELEASE_NAMESPACE = "cpt", "cpt-system"



def render(helm_bin: Path, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return chartlib.template(helm_bin, values=[path], release=RELEASE, namespace=RELEASE_NAMESPACE)


def pod_env(deployment: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it in the pod `pod_name`."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    fields = {"metadata.name": pod_name, "metadata.namespace": RELEASE_NAMESPACE}
    env = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in source:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in source, var
            env[var["name"]] = TOKEN
    return env


def reconcile_passes(op: OperatorProcess) -> float:
    match = re.search(r"^cpt_reconcile_seconds_count (\S+)$", op.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def log_has(op: OperatorProcess, text: str) -> bool:
    return text in op.log_path.read_text(errors="replace")


def cptrun(name: str, bucket: str) -> dict[str, Any]:
    spec = {"baseModel": {"uri": f"s3://{bucket}/models/base", "format": "hf"},
            "data": {"sources": [{"name": "legal", "role": "domain", "uri": f"s3://{bucket}/data/*.jsonl"}]},
            "budget": {"steps": 100}, "schedule": {"warmupSteps": 5},
            "checkpoint": {"uri": f"s3://{bucket}/runs/{name}", "every": 10},
            "resources": {"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "h100"}}}
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def replicas(kube_cluster: Any, helm_bin: Path, prometheus: Any, s3_server: Any,
             tmp_path: Path) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """(standby, leader): two replicas as the chart deploys them, not yet started; the standby is
    the one of lower priority."""
    kube = kube_cluster
    peering = f"peers-{uuid.uuid4().hex[:8]}"
    values = {"operator": {
        "replicas": 2, "peering": {"name": peering, "lifetime": LIFETIME_S}, "prometheusUrl": prometheus.url,
        "extraEnv": [{"name": "CPT_RECONCILE_INTERVAL", "value": "1"}]
        + [{"name": k, "value": v} for k, v in s3_server.env.items()]}}
    objects = render(helm_bin, values, tmp_path)
    for crd in ("cptrun.yaml", "kopf-peerings.yaml"):
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(chartlib.CHART / "crds" / crd))
    for crd in ("cptruns.cpt.mlops.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        kube.wait_established(crd)
    (peering_object,) = chartlib.find(objects, "ClusterKopfPeering")
    kube.wait_for(lambda: kube.kubectl_result("apply", "-f", "-", input=yaml.safe_dump(peering_object))
                  .returncode == 0, "the chart's ClusterKopfPeering applied")
    (deployment,) = chartlib.find(objects, "Deployment")
    fullname = deployment["metadata"]["name"]
    ops = []
    for pod in (f"{fullname}-7d9f8c6b5-k2x4q", f"{fullname}-7d9f8c6b5-w8n3z"):
        # Pods have a network namespace each; two processes on one host need their own ports.
        env = {**os.environ, **pod_env(deployment, pod), "KUBECONFIG": str(kube.kubeconfig),
               "CPT_METRICS_PORT": str(free_port()), "CPT_WEBHOOK_PORT": str(free_port()),
               "CPT_HEALTH_PORT": str(free_port())}
        ops.append(OperatorProcess(env, tmp_path / f"{pod}.log"))
    standby, leader = sorted(ops, key=lambda op: Settings.from_env(op.env).peering_priority)
    try:
        yield standby, leader
    finally:
        for op, role in ((standby, "standby"), (leader, "leader")):
            op.stop()
            if op.log_path.exists():
                print(f"--- {role} log (tail) ---\n{op.tail(80)}")
        kube.kubectl_result("delete", "clusterkopfpeering", peering, "--wait=false")


def test_the_charts_env_gives_each_replica_its_own_peering_priority(replicas: tuple[OperatorProcess, ...]) -> None:
    standby, leader = (Settings.from_env(op.env) for op in replicas)
    assert standby.peering == leader.peering != ""
    assert standby.peering_lifetime_s == leader.peering_lifetime_s == LIFETIME_S
    assert standby.peering_priority < leader.peering_priority


def test_two_peered_replicas_act_as_one_and_the_standby_takes_over_from_a_killed_leader(
        kube_cluster: Any, replicas: tuple[OperatorProcess, OperatorProcess], namespace: str,
        s3_bucket: str) -> None:
    kube, (standby, leader) = kube_cluster, replicas
    # The leader joins a replica that is already working, as in a rolling update.
    standby.start()
    kube.wait_for(lambda: log_has(standby, "Resuming operations"), "a lone replica works", timeout=30)
    leader.start()
    kube.wait_for(lambda: log_has(standby, "Pausing operations in favour of"), "standby pauses", timeout=30)
    assert not log_has(leader, "Pausing")
    # Counted from here: alone, the standby may have worked on runs other tests left behind.
    standby_passes = reconcile_passes(standby)

    kube.apply(cptrun("first", s3_bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "first") == ["first-a1"], "job first-a1", timeout=30)
    job_uid = kube.kubectl_json("get", "job", "first-a1", "-n", namespace)["metadata"]["uid"]
    passes = reconcile_passes(leader)
    time.sleep(4)  # four reconcile intervals
    assert reconcile_passes(leader) > passes, "the leader reconciles every interval"
    assert reconcile_passes(standby) == standby_passes, "the standby never acts while the leader lives"
    assert job_names(kube, namespace, "first") == ["first-a1"]
    assert kube.kubectl_json("get", "job", "first-a1", "-n", namespace)["metadata"]["uid"] == job_uid
    assert status_of(kube, namespace, "first")["attempt"] == 1

    leader.stop(signal.SIGKILL)
    killed = time.monotonic()
    kube.apply(cptrun("second", s3_bucket), namespace=namespace)
    # The leader's last keep-alive counts for LIFETIME_S; the standby wakes up when it expires.
    kube.wait_for(lambda: job_names(kube, namespace, "second") == ["second-a1"], "the standby takes over",
                  timeout=LIFETIME_S + 20)
    assert time.monotonic() - killed < LIFETIME_S + 15
    assert log_has(standby, "Resuming operations")

    # The run started by the dead leader goes on under the new one: its pod finishes, it succeeds.
    kube.wait_for(lambda: [p for p in kube.pods(namespace, "cpt.mlops.dev/run=first")
                           if p["status"].get("phase") == "Running"], "first-a1 running", timeout=30)
    kube.annotate_pods(namespace, "cpt.mlops.dev/run=first", "cpt-test/complete=true")
    kube.wait_for(lambda: status_of(kube, namespace, "first").get("phase") == "Succeeded", "first succeeds",
                  timeout=30)
    assert job_names(kube, namespace, "first") == ["first-a1"] and job_names(kube, namespace, "second") == ["second-a1"]
    assert kube.kubectl_json("get", "job", "first-a1", "-n", namespace)["metadata"]["uid"] == job_uid
    assert status_of(kube, namespace, "first")["attempt"] == 1 and status_of(kube, namespace, "second")["attempt"] == 1
