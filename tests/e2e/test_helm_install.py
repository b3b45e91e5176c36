"""The chart against the real test control plane: every rendered object passes the API server's
validation (server-side dry-run, strict field validation), `helm install` creates an operator whose
pods the API server admits and the scheduler places, `helm test` runs its hook, and
`helm uninstall` leaves the CRD, CptRuns, their children and their checkpoints alone.

kwok plays the kubelet: the operator pods become Running without a container being run."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm import chartlib

pytestmark = [pytest.mark.cluster, pytest.mark.helm, pytest.mark.timeout(300)]

ROOT = chartlib.ROOT
CHART = chartlib.CHART
MONITORING_CRDS = Path(__file__).resolve().parents[1] / "helm" / "monitoring-crds.yaml"


def helm(helm_bin: Path, kube: Any, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_bin), "--kubeconfig", str(kube.kubeconfig), *args],
                          capture_output=True, text=True, timeout=timeout)


def ensure_crds(kube: Any, *paths: Path) -> None:
    for path in paths:
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        for doc in yaml.safe_load_all(path.read_text()):
            kube.wait_established(doc["metadata"]["name"])


def ensure_namespace(kube: Any, name: str) -> None:
    if kube.kubectl_result("get", "namespace", name).returncode != 0:
        kube.kubectl("create", "namespace", name)
    kube.wait_for_default_service_account(name)


def server_dry_run(kube: Any, objects: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    manifest = yaml.safe_dump_all(objects)
    # Discovery of freshly established CRDs can lag a moment behind the Established condition.
    result: list[subprocess.CompletedProcess[str]] = []

    def attempt() -> bool:
        result[:] = [kube.kubectl_result("apply", "--dry-run=server", "--validate=strict",
                                         "-f", "-", input=manifest)]
        return "no matches for kind" not in result[0].stderr

    kube.wait_for(attempt, "kinds of the rendered chart known to the API server")
    return result[0]


@pytest.mark.parametrize("values", ["default", "full"])
def test_rendered_chart_passes_server_side_validation(kube_cluster: Any, helm_bin: Path,
                                                      namespace: str, values: str) -> None:
    ensure_crds(kube_cluster, CHART / "crds" / "cptrun.yaml", CHART / "crds" / "kopf-peerings.yaml",
                MONITORING_CRDS)
    files = [chartlib.FULL_VALUES] if values == "full" else []
    if values == "full":
        for ns in ("team-a", "team-b"):
            ensure_namespace(kube_cluster, ns)
        kube_cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                            "metadata": {"name": "cpt-operator-critical"}, "value": 1000000})
    # The CRDs were applied for real above: their validation is that they were accepted.
    objects = chartlib.template(helm_bin, values=files, namespace=namespace,
                                release=f"v{uuid.uuid4().hex[:6]}")
    hooks = [o for o in objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    release = [o for o in objects if o not in hooks]
    proc = server_dry_run(kube_cluster, release)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(release), proc.stdout
    # Hooks run after the release exists; the test pod needs its service account for admission.
    (sa,) = chartlib.find(release, "ServiceAccount")
    kube_cluster.apply(sa, namespace=namespace)
    assert hooks, "the chart has a helm test hook"
    proc = server_dry_run(kube_cluster, hooks)
    assert proc.returncode == 0, proc.stderr


def test_server_rejects_what_the_schema_of_a_rendered_object_forbids(
        kube_cluster: Any, helm_bin: Path, namespace: str) -> None:
    # The dry-run above would be worthless if the server accepted anything: a misspelt field in
    # the Deployment must fail.
    objects = chartlib.template(helm_bin, namespace=namespace, release=f"v{uuid.uuid4().hex[:6]}")
    (dep,) = chartlib.find(objects, "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    proc = server_dry_run(kube_cluster, [dep])
    assert proc.returncode != 0 and "livenessProbes" in proc.stderr


def deployment_available(kube: Any, ns: str, name: str) -> bool:
    dep = kube.kubectl_json("get", "deployment", name, "-n", ns)
    return any(c["type"] == "Available" and c["status"] == "True"
               for c in dep.get("status", {}).get("conditions", []))


def run_helm_test(helm_bin: Path, kube: Any, release: str, ns: str) -> subprocess.CompletedProcess[str]:
    """`helm test`, completing its hook pod the way kwok lets a test finish a pod."""
    outcome: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: outcome.append(
        helm(helm_bin, kube, "test", release, "-n", ns, "--timeout", "90s")))
    thread.start()
    selector = "app.kubernetes.io/component=test"
    kube.wait_for(lambda: any(p["status"].get("phase") == "Running" for p in kube.pods(ns, selector)),
                  "helm test pod running", timeout=60)
    kube.annotate_pods(ns, selector, "cpt-test/complete=true")
    thread.join(120)
    assert outcome, "helm test did not return"
    return outcome[0]


def test_install_serves_the_crd_runs_the_operator_and_uninstall_keeps_runs_and_checkpoints(
        kube_cluster: Any, helm_bin: Path, namespace: str, s3_server: Any, s3_bucket: str) -> None:
    kube = kube_cluster
    release = f"cpt-{uuid.uuid4().hex[:6]}"
    install = helm(helm_bin, kube, "install", release, str(CHART), "-n", namespace,
                   "--wait", "--timeout", "120s")
    assert install.returncode == 0, install.stderr
    try:
        fullname = f"{release}-cpt-operator"
        notes = install.stdout.split("NOTES:", 1)[1]
        assert f"kubectl -n {namespace} rollout status deployment/{fullname}" in notes
        assert "kubectl get cptruns -A -w" in notes and "CPT / Stability" in notes

        # The operator's pod was admitted (service account, security context) and scheduled.
        kube.wait_for(lambda: deployment_available(kube, namespace, fullname), "operator available")
        (pod,) = kube.pods(namespace, "app.kubernetes.io/component=operator")
        assert pod["status"]["phase"] == "Running" and pod["spec"]["nodeName"]
        assert pod["spec"]["serviceAccountName"] == fullname
        (c,) = pod["spec"]["containers"]
        assert {"PROMETHEUS_URL", "CPT_WEBHOOK_TOKEN", "CPT_TRAINER_IMAGE", "CPT_NAMESPACES"} <= {
            e["name"] for e in c["env"]}

        # The CRDs from crds/ are served.
        resources = json.loads(kube.kubectl("get", "--raw", "/apis/cpt.mlops.dev/v1alpha1"))["resources"]
        assert "cptruns" in {r["name"] for r in resources}
        for crd in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
            kube.wait_established(crd)

        # The operator's service account may do its job, and no more.
        sa = f"system:serviceaccount:{namespace}:{fullname}"
        for verb, resource, allowed in (("create", "jobs.batch", "yes"), ("patch", "cptruns.cpt.mlops.dev", "yes"),
                                        ("list", "secrets", "no"), ("create", "pods", "no"),
                                        ("delete", "cptruns.cpt.mlops.dev", "no")):
            got = kube.kubectl_result("auth", "can-i", verb, resource, "-n", namespace, "--as", sa)
            assert got.stdout.strip() == allowed, (verb, resource, got.stdout, got.stderr)

        tested = run_helm_test(helm_bin, kube, release, namespace)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert re.search(r"Phase:\s+Succeeded", tested.stdout), tested.stdout

        # A run with a checkpoint in S3 and a child object, as the operator leaves them.
        run = yaml.safe_load((ROOT / "examples" / "demo" / "legal.yaml").read_text())
        prefix = f"{s3_bucket}/runs/demo-legal"
        run["spec"]["checkpoint"]["uri"] = f"s3://{prefix}/checkpoints"
        kube.wait_for(lambda: kube.kubectl_result("apply", "-n", namespace, "-f", "-",
                                                  input=json.dumps(run)).returncode == 0,
                      "CptRun created")
        created = kube.kubectl_json("get", "cptrun", "demo-legal", "-n", namespace)
        kube.apply({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "demo-legal-trainer-config", "ownerReferences": [{
                        "apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                        "name": "demo-legal", "uid": created["metadata"]["uid"]}]},
                    "data": {"trainer-config.json": "{}"}}, namespace=namespace)
        fs = s3_server.filesystem()
        checkpoint = {f"{prefix}/checkpoints/step-000006/model.safetensors": b"\x00weights" * 512,
                      f"{prefix}/checkpoints/step-000006/manifest.json": b'{"step": 6}'}
        for key, data in checkpoint.items():
            with fs.open(key, "wb") as f:
                f.write(data)

        uninstall = helm(helm_bin, kube, "uninstall", release, "-n", namespace, "--wait")
        assert uninstall.returncode == 0, uninstall.stderr
        assert kube.kubectl_result("get", "deployment", fullname, "-n", namespace).returncode != 0
        assert kube.kubectl_result("get", "clusterrole", fullname).returncode != 0

        # helm does not delete CRDs from crds/, so nothing cascades to the runs.
        kube.kubectl("get", "crd", "cptruns.cpt.mlops.dev")
        after = kube.kubectl_json("get", "cptrun", "demo-legal", "-n", namespace)
        assert after["metadata"]["uid"] == created["metadata"]["uid"]
        assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert after["spec"] == created["spec"]
        kube.kubectl("get", "configmap", "demo-legal-trainer-config", "-n", namespace)
        fs.invalidate_cache()
        for key, data in checkpoint.items():
            assert fs.cat(key) == data
    finally:
        helm(helm_bin, kube, "uninstall", release, "-n", namespace)
        kube.kubectl_result("delete", "cptrun", "--all", "-n", namespace, "--wait=false")


def test_namespaced_peered_install_creates_roles_and_peering_objects_only_there(
        kube_cluster: Any, helm_bin: Path, namespace: str) -> None:
    kube = kube_cluster
    watched = f"{namespace}-runs"
    ensure_namespace(kube, watched)
    release = f"cpt-{uuid.uuid4().hex[:6]}"
    install = helm(helm_bin, kube, "install", release, str(CHART), "-n", namespace,
                   "--set", f"operator.namespaces={{{watched}}}", "--set", "operator.replicas=2",
                   "--wait", "--timeout", "120s")
    assert install.returncode == 0, install.stderr
    try:
        fullname = f"{release}-cpt-operator"
        kube.wait_for(lambda: deployment_available(kube, namespace, fullname), "operator available")
        pods = kube.pods(namespace, "app.kubernetes.io/component=operator")
        assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)
        kube.kubectl("get", "kopfpeering", fullname, "-n", watched)
        kube.kubectl("get", "role", fullname, "-n", watched)
        assert kube.kubectl_result("get", "clusterrole", fullname).returncode != 0
        sa = f"system:serviceaccount:{namespace}:{fullname}"
        can = lambda ns: kube.kubectl_result(  # noqa: E731
            "auth", "can-i", "create", "jobs.batch", "-n", ns, "--as", sa).stdout.strip()
        assert (can(watched), can(namespace)) == ("yes", "no")

        # The generated webhook token survives upgrades: receivers configured with it keep working.
        secret = f"{fullname}-webhook"
        token = kube.kubectl_json("get", "secret", secret, "-n", namespace)["data"]["token"]
        upgrade = helm(helm_bin, kube, "upgrade", release, str(CHART), "-n", namespace,
                       "--reuse-values", "--set", "operator.replicas=1", "--wait", "--timeout", "120s")
        assert upgrade.returncode == 0, upgrade.stderr
        assert kube.kubectl_json("get", "secret", secret, "-n", namespace)["data"]["token"] == token
    finally:
        helm(helm_bin, kube, "uninstall", release, "-n", namespace)
        kube.kubectl_result("delete", "namespace", watched, "--wait=false")
