"""Kueue's controller manager against the test cluster's API server.

The real `kueue` binary (tests/cluster/build.sh builds it from sigs.k8s.io/kueue), with the
module's own CRDs and webhook configurations. What differs from an in-cluster install, and why:

* No pod runs the webhook server, so the API server reaches it by URL (https://127.0.0.1:PORT)
  rather than through a Service. Kueue's internal certificate management, which writes a Secret
  and patches the Service-based configurations, is disabled; this module makes the serving
  certificate (SAN 127.0.0.1, signed by the cluster's test CA) and registers the configurations
  with `clientConfig.url` and that CA as `caBundle`.
* Only the webhooks of what is installed are registered: Kueue's own kinds and batch/v1 Jobs
  (the one integration enabled). The others (pods, JobSets, Ray...) would intercept objects
  whose integration is off, and with `failurePolicy: Fail` refuse them.
* The visibility API server (an aggregated API) is off: nothing here would route to it.
* With its internal certificates off, Kueue v0.17 reads its metrics server's certificate from a
  fixed path, /etc/kueue/metrics/certs (a Secret mounted there in a Deployment). When that is
  missing, a certificate for 127.0.0.1 is written there once (root needed, as for build.sh's
  apt-get); nothing in the tests scrapes Kueue's metrics.

Queues: `ResourceFlavor` `h100` (nodes labelled pool=h100), `ClusterQueue` `gpu` with a GPU
quota (`gpu_quota`), and `local_queue(namespace)` for a test's namespace. Preemption within the
ClusterQueue is by priority (`WorkloadPriorityClass`, see `priority_class`).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import yaml

from .cluster import (ComponentError, KubeCluster, Process, Workdir, _http_ok, binary, component_dir, ensure_binaries,
                      free_port)

FLAVOR = "h100"
CLUSTER_QUEUE = "gpu"
LOCAL_QUEUE = "gpu"
KUEUE_GROUP = "kueue.x-k8s.io"
_KEPT_GROUPS = {KUEUE_GROUP, "batch"}


def manifests_dir() -> Path:
    """Kueue's CRDs (crds/) and webhook configurations (webhooks.yaml), which build.sh copies from
    the sigs.k8s.io/kueue module beside the binary."""
    return component_dir("kueue")


def webhook_configurations(manifests: str, url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, reached at `url` + each webhook's path, for the kinds of
    `_KEPT_GROUPS` only."""
    out = []
    for doc in yaml.safe_load_all(manifests):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks", []):
            groups = {g for rule in hook.get("rules", []) for g in rule.get("apiGroups", [])}
            if not groups <= _KEPT_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": url + path, "caBundle": base64.b64encode(ca_pem).decode()}
            kept.append(hook)
        doc["webhooks"] = kept
        doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
        out.append(doc)
    return out


CONVERTED = {f"{kind}.{KUEUE_GROUP}" for kind in
             ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")}
"""The CRDs that Kueue converts between v1beta1 and v1beta2 itself (the module's
config/components/crd/kustomization.yaml patches only these); the others need no conversion."""


def crd_with_conversion(crd: dict[str, Any], url: str, ca_pem: bytes) -> dict[str, Any]:
    """Conversion through Kueue's /convert webhook by URL, as the module's kustomize patches set
    it up through a Service."""
    if crd["metadata"]["name"] in CONVERTED:
        crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
            "conversionReviewVersions": ["v1"],
            "clientConfig": {"url": f"{url}/convert", "caBundle": base64.b64encode(ca_pem).decode()}}}
    return crd


def configuration(*, webhook_port: int, cert_dir: Path, health_port: int, metrics_port: int,
                  pods_ready_timeout_s: int) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        # all pods of an admitted gang Running and Ready within the timeout, else evicted and
        # requeued: a half-scheduled gang never holds its GPUs for long
        "waitForPodsReady": {"timeout": f"{pods_ready_timeout_s}s", "blockAdmission": False,
                             "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 1,
                                                   "backoffMaxSeconds": 5}},
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }


METRICS_CERTS = Path("/etc/kueue/metrics/certs")


def ensure_metrics_cert(kube: KubeCluster) -> None:
    if (METRICS_CERTS / "tls.crt").exists() and (METRICS_CERTS / "tls.key").exists():
        return
    crt, key = kube.pki.issue("kueue-metrics", "kueue-metrics", ips=["127.0.0.1"], server=True)
    try:
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        for src, name in ((crt, "tls.crt"), (key, "tls.key")):
            (METRICS_CERTS / name).write_bytes(src.read_bytes())
            (METRICS_CERTS / name).chmod(0o600)
    except PermissionError as exc:
        raise ComponentError(f"kueue: cannot write its metrics certificate to {METRICS_CERTS} ({exc}); "
                             "run the tests as root or create it there") from exc


class Kueue:
    """Kueue's controller manager for one KubeCluster; `stop()` removes its webhooks (which
    would refuse every Job once nothing serves them)."""

    def __init__(self, kube: KubeCluster, root: Path | None = None, gpu_quota: int = 16,
                 pods_ready_timeout_s: int = 60) -> None:
        self.kube = kube
        self.workdir = Workdir(root or kube.root, "kueue")
        self.gpu_quota = gpu_quota
        self.pods_ready_timeout_s = pods_ready_timeout_s
        self.process: Process | None = None
        self._webhooks: list[str] = []

    def start(self, timeout: float = 90.0) -> Kueue:
        ensure_binaries(["kueue"])
        manifests = manifests_dir()
        webhook_port, health_port = free_port(), free_port()
        url = f"https://127.0.0.1:{webhook_port}"
        ca_pem = self.kube.pki.ca_cert.read_bytes()
        crds = [crd_with_conversion(yaml.safe_load(p.read_text()), url, ca_pem)
                for p in sorted((manifests / "crds").glob("*.yaml"))]
        self.kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                          input="\n---\n".join(json.dumps(c) for c in crds))
        names = [f"crd/{c['metadata']['name']}" for c in crds]
        self.kube.wait_for(lambda: self.kube.kubectl_result(
            "wait", "--for=condition=Established", "--timeout=5s", *names).returncode == 0,
            "Kueue's CRDs established", 60)
        self.kube.kubectl_result("create", "namespace", "kueue-system")
        ensure_metrics_cert(self.kube)
        cert_dir = self.workdir / "certs"
        cert_dir.mkdir(exist_ok=True)
        crt, key = self.kube.pki.issue("kueue-webhook", "kueue-webhook", ips=["127.0.0.1"], server=True)
        (cert_dir / "tls.crt").write_bytes(crt.read_bytes())
        (cert_dir / "tls.key").write_bytes(key.read_bytes())
        config = configuration(webhook_port=webhook_port, cert_dir=cert_dir, health_port=health_port,
                               metrics_port=free_port(), pods_ready_timeout_s=self.pods_ready_timeout_s)
        config_path = self.workdir / "config.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        self.process = Process("kueue", [binary("kueue"), f"--config={config_path}", "--zap-log-level=2"],
                               self.workdir / "kueue.log", env={"KUBECONFIG": str(self.kube.kubeconfig)})
        self.kube.processes.append(self.process.start())
        self.process.wait_until(lambda: _http_ok(f"http://127.0.0.1:{health_port}/readyz"),
                                "ready (/readyz)", timeout)
        hooks = webhook_configurations((manifests / "webhooks.yaml").read_text(), url, ca_pem)
        self.kube.apply(hooks)
        self._webhooks = [f"{h['kind'].lower()}/{h['metadata']['name']}" for h in hooks]
        # the webhooks answer (a ResourceFlavor goes through Kueue's own), then the queues
        self.process.wait_until(lambda: self.kube.apply(self.flavor_and_queue()), "serving its webhooks", 60)
        return self

    def flavor_and_queue(self) -> list[dict[str, Any]]:
        flavor = {"apiVersion": f"{KUEUE_GROUP}/v1beta2", "kind": "ResourceFlavor",
                  "metadata": {"name": FLAVOR}, "spec": {"nodeLabels": {"pool": "h100"}}}
        big = {"name": FLAVOR, "resources": [
            {"name": "nvidia.com/gpu", "nominalQuota": self.gpu_quota},
            {"name": "cpu", "nominalQuota": 1000}, {"name": "memory", "nominalQuota": "100Ti"}]}
        queue = {"apiVersion": f"{KUEUE_GROUP}/v1beta2", "kind": "ClusterQueue",
                 "metadata": {"name": CLUSTER_QUEUE},
                 "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                          "preemption": {"withinClusterQueue": "LowerPriority"},
                          "resourceGroups": [{"coveredResources": ["nvidia.com/gpu", "cpu", "memory"],
                                              "flavors": [big]}]}}
        return [flavor, queue]

    def local_queue(self, namespace: str, name: str = LOCAL_QUEUE) -> str:
        self.kube.apply({"apiVersion": f"{KUEUE_GROUP}/v1beta2", "kind": "LocalQueue",
                         "metadata": {"name": name, "namespace": namespace},
                         "spec": {"clusterQueue": CLUSTER_QUEUE}})
        return name

    def priority_class(self, name: str, value: int) -> str:
        self.kube.apply({"apiVersion": f"{KUEUE_GROUP}/v1beta2", "kind": "WorkloadPriorityClass",
                         "metadata": {"name": name}, "value": value})
        return name

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.kube.kubectl_json("get", f"workloads.{KUEUE_GROUP}", "-n", namespace)["items"])

    def stop(self) -> None:
        for name in self._webhooks:
            self.kube.kubectl_result("delete", name, "--ignore-not-found")
        self._webhooks = []
        if self.process is not None:
            self.process.stop()
            if self.process in self.kube.processes:
                self.kube.processes.remove(self.process)
            self.process = None

    def __enter__(self) -> Kueue:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
