"""At most one attempt's pods at any time, on the real control plane of tests/cluster.

kwok plays the pods: a pod held by a finalizer of the test's stays Running while it is being
deleted, as a real trainer does through its termination grace (writing its last checkpoint).
"""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.e2e.operator_harness import OperatorProcess, condition, events, job_names, status_of
from tests.e2e.test_operator import cptrun

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.timeout(180)]

HOLD = "cpt-test/hold"


def pod_of(kube: Any, ns: str, run: str, attempt: int, index: int) -> dict[str, Any] | None:
    pods = kube.pods(ns, f"cpt.mlops.dev/run={run},cpt.mlops.dev/attempt={attempt},"
                         f"batch.kubernetes.io/job-completion-index={index}")
    return pods[0] if pods else None


def set_finalizers(kube: Any, ns: str, pod: str, finalizers: list[str]) -> None:
    kube.kubectl("patch", "pod", pod, "-n", ns, "--type=merge", "-p",
                 json.dumps({"metadata": {"finalizers": finalizers}}))


def test_a_failed_job_whose_pods_still_run_gets_no_second_attempt_until_they_are_gone(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube, run = kube_cluster, "held"
    kube.apply(cptrun(run, s3_bucket, nodes=2, stopPolicy={"maxAttemptRestarts": 2}), namespace=namespace)
    for index in (0, 1):
        kube.wait_for(lambda index=index: (pod_of(kube, namespace, run, 1, index) or {}).get("status", {}).get("phase")
                      == "Running", f"pod {index} of attempt 1 running", timeout=30)
    survivor = pod_of(kube, namespace, run, 1, 1)
    assert survivor is not None
    name = survivor["metadata"]["name"]
    set_finalizers(kube, namespace, name, [*survivor["metadata"].get("finalizers", []), HOLD])

    kube.annotate_pods(namespace, f"cpt.mlops.dev/run={run},cpt.mlops.dev/attempt=1,"
                                  "batch.kubernetes.io/job-completion-index=0", "cpt-test/fail=true")
    # backoffLimit 0: the Job is marked to fail and its other pod is told to stop, but still runs
    kube.wait_for(lambda: (pod_of(kube, namespace, run, 1, 1) or {}).get("metadata", {}).get("deletionTimestamp"),
                  "the surviving pod being deleted", timeout=30)
    job = kube.kubectl_json("get", "job", f"{run}-a1", "-n", namespace)
    assert any(c["type"] in ("FailureTarget", "Failed") and c["status"] == "True" for c in job["status"]["conditions"])
    time.sleep(4)  # several passes at one a second
    assert job_names(kube, namespace, run) == [f"{run}-a1"]
    status = status_of(kube, namespace, run)
    assert condition(status, "Progressing")["reason"] == "WaitingForPods"
    assert (status["attempt"], status["restarts"]) == (1, 0)
    assert "pods of attempt 1" in condition(status, "Progressing")["message"]
    assert (pod_of(kube, namespace, run, 1, 1) or {}).get("status", {}).get("phase") == "Running"

    held = pod_of(kube, namespace, run, 1, 1) or {}
    set_finalizers(kube, namespace, name, [f for f in held["metadata"].get("finalizers", []) if f != HOLD])
    kube.wait_for(lambda: f"{run}-a2" in job_names(kube, namespace, run), "attempt 2 once the pods are gone",
                  timeout=30)
    assert [p for p in kube.pods(namespace, f"cpt.mlops.dev/run={run},cpt.mlops.dev/attempt=1")
            if p["status"].get("phase") not in ("Succeeded", "Failed")] == []
    status = status_of(kube, namespace, run)
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert "exited with code 1" in condition(status, "Degraded")["message"]


def stray_copy(obj: dict[str, Any], attempt: int, name: str) -> dict[str, Any]:
    """An attempt's object as a pass killed before it wrote status would have left it."""
    meta = obj["metadata"]
    labels = {**meta["labels"], "cpt.mlops.dev/attempt": str(attempt)}
    out = {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj["kind"],
           "metadata": {"name": name, "labels": labels, "ownerReferences": meta["ownerReferences"]}}
    if obj["kind"] == "ConfigMap":
        out["data"] = obj["data"]
    else:
        spec = json.loads(json.dumps(obj["spec"]))
        spec.pop("selector", None)
        template = spec["template"]["metadata"]
        template["labels"] = {k: v for k, v in template["labels"].items()
                              if not k.startswith("batch.kubernetes.io/") and k not in ("controller-uid", "job-name")}
        template["labels"]["cpt.mlops.dev/attempt"] = str(attempt)
        out["spec"] = spec
    return out


def test_a_stray_attempts_objects_are_swept_and_reported(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube, run = kube_cluster, "strayed"
    kube.apply(cptrun(run, s3_bucket), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, run) == [f"{run}-a1"], f"job {run}-a1", timeout=30)
    job = kube.kubectl_json("get", "job", f"{run}-a1", "-n", namespace)
    config = kube.kubectl_json("get", "configmap", f"{run}-a1", "-n", namespace)
    stray = [stray_copy({**job, "kind": "Job", "apiVersion": "batch/v1"}, 2, f"{run}-a2"),
             stray_copy({**config, "kind": "ConfigMap"}, 2, f"{run}-a2")]
    kube.apply(stray, namespace=namespace)

    kube.wait_for(lambda: job_names(kube, namespace, run) == [f"{run}-a1"], "the stray Job swept", timeout=30)
    kube.wait_for(lambda: kube.kubectl_result("get", "configmap", f"{run}-a2", "-n", namespace).returncode != 0,
                  "the stray ConfigMap swept", timeout=30)
    kube.wait_for(lambda: not kube.pods(namespace, f"cpt.mlops.dev/run={run},cpt.mlops.dev/attempt=2"),
                  "the stray Job's pods gone", timeout=30)
    swept = [e for e in events(kube, namespace, run) if e["reason"] == "StrayAttemptSwept"]
    assert swept and swept[0]["type"] == "Warning"
    assert "deleted attempt 2 (ConfigMap, Job" in swept[0]["message"]
    status = status_of(kube, namespace, run)
    assert (status["phase"], status["attempt"]) == ("Running", 1)
    assert kube.kubectl_result("get", "configmap", f"{run}-a1", "-n", namespace).returncode == 0
