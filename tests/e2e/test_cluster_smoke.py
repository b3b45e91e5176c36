"""Each part of the test cluster is real: proven once, cheaply.

Kubernetes objects go through the real API server, controllers and
scheduler; only the kubelet is simulated (kwok), so pods change status but
run nothing.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

TEST_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.cpt-test.io
spec:
  group: smoke.cpt-test.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
"""


def indexed_gpu_job(name: str, completions: int = 2, gpus: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed", "completions": completions, "parallelism": completions,
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"pool": "h100"},
                "containers": [{
                    "name": "trainer", "image": "example.invalid/trainer:none",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }],
            }},
        },
    }


def job_condition(kube: Any, ns: str, name: str, kind: str) -> bool:
    job = kube.kubectl_json("get", "job", name, "-n", ns)
    return any(c["type"] == kind and c["status"] == "True"
               for c in job.get("status", {}).get("conditions", []))


@pytest.mark.cluster
def test_crd_and_custom_object(kube_cluster: Any, namespace: str) -> None:
    kube_cluster.apply(TEST_CRD)
    kube_cluster.wait_established("widgets.smoke.cpt-test.io")
    widget = {"apiVersion": "smoke.cpt-test.io/v1", "kind": "Widget",
              "metadata": {"name": "w1"}, "spec": {"size": 3}}
    kube_cluster.wait_for(  # discovery may lag the Established condition briefly
        lambda: kube_cluster.kubectl_result(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(widget)).returncode == 0,
        "widget created")
    got = kube_cluster.kubectl_json("get", "widgets", "w1", "-n", namespace)
    assert got["spec"] == {"size": 3}
    # The schema is enforced by the real API server.
    bad = kube_cluster.kubectl_result(
        "apply", "-n", namespace, "-f", "-",
        input=json.dumps({**widget, "metadata": {"name": "w2"}, "spec": {"size": 0}}))
    assert bad.returncode != 0 and "spec.size" in bad.stderr


@pytest.mark.cluster
def test_indexed_gpu_job_runs_on_kwok_gpu_nodes_and_succeeds(kube_cluster: Any, namespace: str) -> None:
    kube_cluster.apply(indexed_gpu_job("train"), namespace=namespace)
    # Real Job controller creates the pods; real scheduler places one per
    # H100 node (8 GPUs each fills a node); kwok marks them Running.
    def two_running() -> list[dict[str, Any]] | None:
        pods = [p for p in kube_cluster.pods(namespace, "job-name=train")
                if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    pods = kube_cluster.wait_for(two_running, "2 running pods of job train")
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert nodes == {"gpu-h100-0", "gpu-h100-1"}
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                  for p in pods) == ["0", "1"]

    kube_cluster.annotate_pods(namespace, "job-name=train", "cpt-test/complete=true")
    kube_cluster.wait_for(lambda: job_condition(kube_cluster, namespace, "train", "Complete"),
                          "job train Complete")
    job = kube_cluster.kubectl_json("get", "job", "train", "-n", namespace)
    assert job["status"]["succeeded"] == 2


@pytest.mark.cluster
def test_gpu_requests_are_enforced_by_the_scheduler(kube_cluster: Any, namespace: str) -> None:
    # 9 GPUs fit on no node: the pod must stay Pending as Unschedulable.
    kube_cluster.apply(indexed_gpu_job("too-big", completions=1, gpus=9), namespace=namespace)

    def unschedulable() -> bool:
        pods = kube_cluster.pods(namespace, "job-name=too-big")
        return bool(pods) and any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in pods[0]["status"].get("conditions", []))

    kube_cluster.wait_for(unschedulable, "pod of too-big Unschedulable")


@pytest.mark.cluster
def test_failed_pod_fails_the_job(kube_cluster: Any, namespace: str) -> None:
    kube_cluster.apply(indexed_gpu_job("doomed", completions=1), namespace=namespace)
    kube_cluster.wait_for(
        lambda: any(p["status"].get("phase") == "Running"
                    for p in kube_cluster.pods(namespace, "job-name=doomed")),
        "pod of doomed Running")
    kube_cluster.annotate_pods(namespace, "job-name=doomed", "cpt-test/fail=true")
    kube_cluster.wait_for(lambda: job_condition(kube_cluster, namespace, "doomed", "Failed"),
                          "job doomed Failed")
    pod = kube_cluster.pods(namespace, "job-name=doomed")[0]
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1


@pytest.mark.cluster
def test_owner_reference_garbage_collection(kube_cluster: Any, namespace: str) -> None:
    kube_cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = kube_cluster.kubectl_json("get", "configmap", "owner", "-n", namespace)
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner["metadata"]["uid"]}]},
    }
    kube_cluster.apply(child, namespace=namespace)
    kube_cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    kube_cluster.wait_for(
        lambda: kube_cluster.kubectl_result("get", "configmap", "child", "-n", namespace)
        .returncode != 0,
        "child deleted by the garbage collector")


@pytest.mark.prometheus
def test_prometheus_scrapes_a_target(prometheus: Any) -> None:
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import MetricsHandler

    registry = CollectorRegistry()
    Gauge("cpt_smoke_value", "smoke test gauge", registry=registry).set(42)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    run = uuid.uuid4().hex[:8]
    try:
        prometheus.add_target(address, {"smoke_run": run})
        result = prometheus.wait_for(f'cpt_smoke_value{{smoke_run="{run}"}}', timeout=30)
        assert float(result[0]["value"][1]) == 42
    finally:
        prometheus.remove_target(address)
        server.shutdown()


@pytest.mark.s3
def test_s3_roundtrip_through_s3fs(s3_server: Any, s3_bucket: str) -> None:
    fs = s3_server.filesystem()
    path = f"{s3_bucket}/runs/smoke/blob.bin"
    payload = bytes(range(256)) * 1024
    with fs.open(path, "wb") as f:
        f.write(payload)
    with fs.open(path, "rb") as f:
        assert f.read() == payload
    assert fs.ls(f"{s3_bucket}/runs/smoke") == [path]
    assert fs.info(path)["size"] == len(payload)


@pytest.mark.helm
def test_helm_version(helm_bin: Any) -> None:
    import subprocess

    out = subprocess.run([str(helm_bin), "version", "--short"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("v3.21."), out
