"""Attempts whose pods never start, against the real control plane: the operator (a local
process) names the cause in the Started condition and an event, then at the run's start deadline
deletes the Job and fails the run (StartTimeout) without a restart.

The scheduler's verdict comes from the real scheduler over kwok's GPU nodes. The kubelet's
(an image that cannot be pulled, a Secret that is gone, a command that is not in the image) come
from the real node's kubelet and containerd: those tests place the run's pods there with
`real_node.placement` and `gpusPerNode: 0`.

Each run waits out its start deadline. The runs that need nothing done while they wait are applied
together before the module's first test (`applied`), so their deadlines pass at the same time,
while the first test (the Secret, which needs the node cordoned for a while) waits out its own.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from tests.e2e.operator_harness import OperatorProcess, condition, events, job_names, status_of
from tests.e2e.test_operator import cptrun

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.timeout(300)]

TIMEOUT_S = 30  # resources.startTimeoutSeconds' minimum
MISSING_IMAGE = "127.0.0.1:1/cpt-test/no-such-trainer:v1"
"""No registry listens there: the pull is refused at once (ErrImagePull, then ImagePullBackOff)."""


def started(kube: Any, ns: str, run: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        cond = condition(status_of(kube, ns, run), "Started")
        return cond if cond.get("reason") == reason else None

    return kube.wait_for(seen, f"{run}: Started reason {reason}", timeout=timeout)


def event(kube: Any, ns: str, run: str, reason: str) -> dict[str, Any]:
    """The run's event with `reason` (posted just after the status that names the cause)."""
    return kube.wait_for(lambda: next((e for e in events(kube, ns, run) if e["reason"] == reason), None),
                         f"{run}: event {reason}", timeout=30)


def failed(kube: Any, ns: str, run: str, timeout: float = TIMEOUT_S + 60) -> dict[str, Any]:
    return kube.wait_for(lambda: (st := status_of(kube, ns, run)).get("phase") == "Failed" and st,
                         f"{run}: phase Failed", timeout=timeout)


def no_pods_left(kube: Any, ns: str, run: str) -> None:
    kube.wait_for(lambda: not kube.pods(ns, f"cpt.mlops.dev/run={run}"), f"{run}: its pods gone", timeout=60)


def real_resources(real_node: Any, **extra: Any) -> dict[str, Any]:
    return {"nodes": 1, "gpusPerNode": 0, "startTimeoutSeconds": TIMEOUT_S, **real_node.placement, **extra}


@dataclass(frozen=True)
class Applied:
    namespace: str
    bucket: str


def too_big(bucket: str) -> dict[str, Any]:
    resources = {"nodes": 1, "gpusPerNode": 16, "nodeSelector": {"pool": "h100"}, "startTimeoutSeconds": TIMEOUT_S}
    return cptrun("too-big", bucket, resources=resources)


def no_image(bucket: str, real_node: Any) -> dict[str, Any]:
    return cptrun("no-image", bucket, resources=real_resources(real_node, image=MISSING_IMAGE))


def no_python(bucket: str, real_node: Any) -> dict[str, Any]:
    from tests.cluster.node import pause_image

    return cptrun("no-python", bucket, resources=real_resources(real_node, image=pause_image()),
                  stopPolicy={"maxAttemptRestarts": 3})


@pytest.fixture(scope="module")
def applied(kube_cluster: Any, operator: OperatorProcess, s3_server: Any,
            request: pytest.FixtureRequest) -> Iterator[Applied]:
    """too-big, no-image and no-python, applied in one namespace of their own before the first
    test; the real node's two once their pods are on it (or the run has already failed), so that
    the Secret test's cordon cannot hold them back."""
    kube = kube_cluster
    ns, bucket = kube.create_namespace(f"t-{uuid.uuid4().hex[:10]}"), s3_server.create_bucket()
    real_node = request.getfixturevalue("real_node") if os.geteuid() == 0 else None
    try:
        kube.apply(too_big(bucket), namespace=ns)
        if real_node is not None:
            runs = [no_image(bucket, real_node), no_python(bucket, real_node)]
            for run in runs:
                kube.apply(run, namespace=ns)

            def placed(run: str) -> bool:
                pods = kube.pods(ns, f"cpt.mlops.dev/run={run}")
                return any(p["spec"].get("nodeName") for p in pods) or \
                    status_of(kube, ns, run).get("phase") == "Failed"

            kube.wait_for(lambda: all(placed(r["metadata"]["name"]) for r in runs), "pods on the real node",
                          timeout=60)
        yield Applied(ns, bucket)
    finally:
        kube.kubectl_result("delete", "namespace", ns, "--wait=false")
        try:
            s3_server.delete_bucket(bucket)
        except Exception:  # noqa: BLE001 - cleanup must not mask the test's outcome
            pass


@pytest.mark.real_node
def test_a_secret_gone_before_the_pod_starts_is_named_and_the_run_fails_at_its_start_deadline(
        kube_cluster: Any, real_node: Any, operator: OperatorProcess, namespace: str, s3_bucket: str,
        s3_server: Any, base_image: str, applied: Applied) -> None:
    """The operator reads the run's Secret before it creates the attempt, so the Secret goes
    while the pod waits for a node (the real node cordoned), and the kubelet then meets it gone."""
    kube = kube_cluster
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
              "stringData": {k: v for k, v in s3_server.env.items() if k.startswith("AWS_")}}
    kube.apply(secret, namespace=namespace)
    kube.kubectl("cordon", real_node.name)
    try:
        run = cptrun("no-secret", s3_bucket,
                     resources=real_resources(real_node, image=base_image, s3SecretRef="s3-creds",
                                              startTimeoutSeconds=60))
        kube.apply(run, namespace=namespace)
        cond = started(kube, namespace, "no-secret", "Unschedulable")
        assert "unschedulable" in cond["message"], cond  # the scheduler: the node is cordoned
        kube.kubectl("delete", "secret", "s3-creds", "-n", namespace)
    finally:
        kube.kubectl("uncordon", real_node.name)
    cond = started(kube, namespace, "no-secret", "ContainerConfigError")
    assert 'CreateContainerConfigError: secret "s3-creds" not found' in cond["message"], cond
    st = status_of(kube, namespace, "no-secret")
    assert condition(st, "SpecValid")["reason"] == "S3SecretUnreadable" and st["phase"] == "Running"
    assert "s3-creds" in event(kube, namespace, "no-secret", "ContainerConfigError")["message"]

    st = failed(kube, namespace, "no-secret", timeout=90)
    assert condition(st, "Failed")["reason"] == "StartTimeout"
    assert 'secret "s3-creds" not found' in st["message"] and st.get("restarts", 0) == 0
    assert job_names(kube, namespace, "no-secret") == []
    no_pods_left(kube, namespace, "no-secret")


def test_a_pod_no_node_fits_is_named_then_the_run_fails_at_its_start_deadline(
        kube_cluster: Any, applied: Applied) -> None:
    kube, namespace = kube_cluster, applied.namespace
    cond = started(kube, namespace, "too-big", "Unschedulable")
    assert cond["status"] == "False" and "pod too-big-a1-0-" in cond["message"], cond
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond  # the scheduler's own words
    assert "Insufficient nvidia.com/gpu" in event(kube, namespace, "too-big", "Unschedulable")["message"]

    st = failed(kube, namespace, "too-big")
    assert condition(st, "Failed")["reason"] == "StartTimeout"
    assert st["message"].startswith(f"attempt 1 did not start within {TIMEOUT_S} s: pod too-big-a1-0-"), st
    assert "Insufficient nvidia.com/gpu" in st["message"] and (st["attempt"], st.get("restarts", 0)) == (1, 0)
    assert job_names(kube, namespace, "too-big") == []
    no_pods_left(kube, namespace, "too-big")
    listed = kube.kubectl("get", "cptrun", "too-big", "-n", namespace)
    assert "Unschedulable" in listed and "Failed" in listed  # the Start and Phase columns


@pytest.mark.real_node
def test_an_image_the_node_cannot_pull_fails_the_run_at_its_start_deadline(
        kube_cluster: Any, real_node: Any, applied: Applied) -> None:
    kube, namespace = kube_cluster, applied.namespace
    cond = started(kube, namespace, "no-image", "ImagePullFailed")
    assert "pod no-image-a1-0-" in cond["message"] and MISSING_IMAGE in cond["message"], cond
    assert MISSING_IMAGE in event(kube, namespace, "no-image", "ImagePullFailed")["message"]

    st = failed(kube, namespace, "no-image")
    assert condition(st, "Failed")["reason"] == "StartTimeout", st
    assert ("ErrImagePull" in st["message"] or "ImagePullBackOff" in st["message"]) and MISSING_IMAGE in st["message"]
    assert (st["attempt"], st.get("restarts", 0)) == (1, 0)
    assert job_names(kube, namespace, "no-image") == []
    no_pods_left(kube, namespace, "no-image")


@pytest.mark.real_node
def test_a_command_that_is_not_in_the_image_fails_the_run_without_a_restart(
        kube_cluster: Any, real_node: Any, applied: Applied) -> None:
    """The node's pause image holds only /pause: the trainer's `python` cannot be executed, the
    container ends with StartError and the Job fails; a restart would fail the same way."""
    kube, namespace = kube_cluster, applied.namespace
    st = failed(kube, namespace, "no-python", timeout=90)
    assert condition(st, "Failed")["reason"] == "StartFailed", st
    assert "StartError" in st["message"] and "python" in st["message"], st
    assert (st["attempt"], st.get("restarts", 0)) == (1, 0)
    assert condition(st, "Started")["reason"] == "ContainerRunFailed"
    time.sleep(3)  # no second attempt comes
    assert json.loads(kube.kubectl("get", "cptrun", "no-python", "-n", namespace, "-o", "json"))["status"][
        "attempt"] == 1
