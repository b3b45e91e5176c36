"""Pods on the real node find each other by name, reach the API server through the `kubernetes`
Service, and are found and scraped by Prometheus.

Cluster DNS is real CoreDNS run as a host process on the node's bridge gateway, and the
`kubernetes` Service is one DNAT rule of the node's own: the stand-ins for a CoreDNS Deployment
and for kube-proxy (tests/cluster/podnet.py). What an Indexed Job's trainers need for torchrun's
c10d rendezvous (rank 0 by its stable name, a TCP connection to it) and what the operator needs
as a pod (the in-cluster config) are exercised here as they would be used.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.cluster import KUBERNETES_SERVICE, Prometheus
from tests.e2e.real_pods import RESTRICTED, run_pod

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.timeout(600)]

# Each pod of a 2-pod Indexed Job resolves both pods' stable names (`<job>-<i>.<service>`
# through the search path), then pod 0 listens and pod 1 connects, as torchrun's c10d store does.
RENDEZVOUS = r"""
import json, os, socket, sys, time

job, service, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
index = int(os.environ["JOB_COMPLETION_INDEX"])
deadline = time.monotonic() + 120

def retry(call):
    while True:  # the other pod (and its DNS record) may not exist yet
        try:
            return call()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

print("RESOLV " + json.dumps(open("/etc/resolv.conf").read()), flush=True)
names = [f"{job}-{i}.{service}" for i in range(2)]
print("RESOLVED " + json.dumps({n: retry(lambda: socket.gethostbyname(n)) for n in names}), flush=True)
if index == 0:
    with socket.create_server(("0.0.0.0", port)) as server:
        conn, peer = server.accept()
        with conn:
            message = conn.recv(100).decode()
            conn.sendall(b"hello from 0")
else:
    conn = retry(lambda: socket.create_connection((names[0], port), timeout=5))
    with conn:
        conn.sendall(b"hello from 1")
        message, peer = conn.recv(100).decode(), conn.getpeername()
print("GOT " + json.dumps({"peer": peer[0], "message": message}), flush=True)
"""


def lines(logs: str, tag: str) -> Any:
    (line,) = [ln for ln in logs.splitlines() if ln.startswith(tag + " ")]
    return json.loads(line.removeprefix(tag + " "))


def test_an_indexed_jobs_pods_resolve_each_other_by_hostname_and_connect(
        kube_cluster: Any, real_node: Any, namespace: str, base_image: str) -> None:
    job = service = "rdzv"
    kube_cluster.apply([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": service},
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                  "selector": {"batch.kubernetes.io/job-name": job},
                  "ports": [{"name": "c10d", "port": 29500}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job},
         "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                  "template": {"spec": {
                      **real_node.placement, "subdomain": service, "restartPolicy": "Never",
                      "automountServiceAccountToken": False,
                      "containers": [{"name": "main", "image": base_image, "imagePullPolicy": "Never",
                                      "command": ["python3", "-c", RENDEZVOUS, job, service, "29500"]}]}}}},
    ], namespace=namespace)

    def finished() -> str | None:
        conditions = kube_cluster.kubectl_json("get", "job", job, "-n", namespace)["status"].get("conditions", [])
        return next((c["type"] for c in conditions
                     if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)

    outcome = kube_cluster.wait_for(finished, f"job {job} to finish", timeout=240, interval=1)
    pods = {p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: p
            for p in kube_cluster.pods(namespace, f"batch.kubernetes.io/job-name={job}")}
    logs = {i: kube_cluster.kubectl("logs", p["metadata"]["name"], "-n", namespace) for i, p in pods.items()}
    assert outcome == "Complete", logs
    ips = {i: p["status"]["podIP"] for i, p in pods.items()}
    for i in ("0", "1"):
        resolv = lines(logs[i], "RESOLV")
        assert f"nameserver {real_node.dns_ip}" in resolv
        assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in resolv
        assert lines(logs[i], "RESOLVED") == {f"{job}-0.{service}": ips["0"], f"{job}-1.{service}": ips["1"]}
    assert lines(logs["0"], "GOT") == {"peer": ips["1"], "message": "hello from 1"}
    assert lines(logs["1"], "GOT") == {"peer": ips["0"], "message": "hello from 0"}


IN_CLUSTER = r"""
import json, os, socket
from kubernetes import client, config

config.load_incluster_config()  # KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA
api, namespace = client.CoreV1Api(), os.environ["NAMESPACE"]
try:
    api.list_namespaced_secret(namespace)
    secrets = "allowed"
except client.ApiException as exc:
    secrets = exc.status
print("RESULT " + json.dumps({
    "host": client.Configuration.get_default_copy().host,
    "pods": [p.metadata.name for p in api.list_namespaced_pod(namespace).items],
    "secrets": secrets,
    "kubernetes.default.svc": socket.gethostbyname("kubernetes.default.svc"),
}), flush=True)
"""


def test_a_pod_lists_pods_through_the_kubernetes_service_with_its_service_account(
        kube_cluster: Any, real_node: Any, namespace: str, operator_image: str) -> None:
    """The in-cluster config dials 10.0.0.1:443 and verifies the server against the mounted CA;
    the node's DNAT takes it to the API server, which sees the pod's ServiceAccount."""
    rbac = "rbac.authorization.k8s.io"
    kube_cluster.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "lister"}},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": {"name": "pod-lister"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": {"name": "pod-lister"},
         "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "pod-lister"},
         "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}]},
    ], namespace=namespace)
    phase, pod, logs = run_pod(kube_cluster, real_node, namespace, "lister", {
        "image": operator_image, "securityContext": RESTRICTED,
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "command": ["python", "-c", IN_CLUSTER],
    }, pod_spec={"serviceAccountName": "lister", "automountServiceAccountToken": True})
    assert phase == "Succeeded", (pod["status"], logs)
    result = lines(logs, "RESULT")
    service_ip, service_port = KUBERNETES_SERVICE
    assert result == {"host": f"https://{service_ip}:{service_port}", "pods": ["lister"],
                      "secrets": 403, "kubernetes.default.svc": service_ip}


def test_prometheus_finds_an_annotated_pod_scrapes_it_at_its_pod_ip_and_answers_a_pod(
        kube_cluster: Any, real_node: Any, namespace: str, base_image: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The annotations the operator puts on trainer pods, read by the harness's pod discovery
    (Debian's Prometheus lacks kubernetes_sd_configs); then a pod queries Prometheus at the
    host's address, as the operator's gates will."""
    prom = Prometheus(tmp_path_factory.mktemp("prometheus-pods"), discover_pods=kube_cluster,
                      host=real_node.ip).start()
    try:
        kube_cluster.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "exporter", "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/m/metrics"}},
            "spec": {**real_node.placement, "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": base_image, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", "mkdir -p /srv/m && cd /srv && "
                                                 "echo 'pod_network_probe 1' > m/metrics && "
                                                 "exec python3 -m http.server 9400"]}]},
        }, namespace=namespace)
        (sample,) = prom.wait_for(f'pod_network_probe{{namespace="{namespace}"}}', timeout=120)
        pod = kube_cluster.kubectl_json("get", "pod", "exporter", "-n", namespace)
        assert sample["metric"]["pod"] == "exporter"
        assert sample["metric"]["instance"] == f"{pod['status']['podIP']}:9400"
        assert sample["metric"]["job"] == "kubernetes-pods"

        query = f"{prom.url}/api/v1/query?query=pod_network_probe"
        phase, reader, logs = run_pod(kube_cluster, real_node, namespace, "reader", {
            "image": base_image, "command": ["python3", "-c", f"import urllib.request; "
                                             f"print(urllib.request.urlopen('{query}').read().decode())"]})
        assert phase == "Succeeded", (reader["status"], logs)
        (answer,) = json.loads(logs)["data"]["result"]
        assert answer["metric"]["pod"] == "exporter"
    finally:
        prom.stop()
