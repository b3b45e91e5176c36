"""Gang admission by a real Kueue (tests/cluster/kueue.py) on the real control plane.

Two 2-node runs against a ClusterQueue with GPUs for one: the second waits with a condition and
no pod until the first is done, longer than its start deadline, which counts from its admission.
A higher-priority run preempts a lower one mid-training; the lower one resumes from its last
checkpoint once re-admitted, without spending a restart. kwok plays the pods; Kueue, the Job
controller and the scheduler are real.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from cpt_api import kueue as kq
from tests.cluster.kueue import Kueue
from tests.e2e.operator_harness import (OperatorProcess, condition, events, job_names, status_of, trainer_config)
from tests.e2e.test_operator import cptrun, write_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.timeout(240)]

GPUS = 8  # per node: a 2-node run takes both kwok H100 nodes, all the ClusterQueue's quota
PODS_READY_TIMEOUT_S = 10
"""Kueue's waitForPodsReady.timeout here (kwok's pods are ready at once, unless unschedulable)."""
START_TIMEOUT_S = 30
"""resources.startTimeoutSeconds of a run that waits in the queue for longer."""


@pytest.fixture(scope="module")
def kueue(kube_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with Kueue(kube_cluster, tmp_path_factory.mktemp("kueue"), gpu_quota=2 * GPUS,
               pods_ready_timeout_s=PODS_READY_TIMEOUT_S) as k:
        yield k


def queued(name: str, bucket: str, resources: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    doc = cptrun(name, bucket, nodes=2, gpus=GPUS, **spec)
    doc["spec"]["resources"].update({"queue": "gpu", **(resources or {})})
    return doc


def pods(kube: Any, ns: str, run: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"cpt.mlops.dev/run={run}" + (f",cpt.mlops.dev/attempt={attempt}" if attempt else "")
    return [p for p in kube.pods(ns, selector) if not p["metadata"].get("deletionTimestamp")]


def running_pods(kube: Any, ns: str, run: str, attempt: int) -> bool:
    found = pods(kube, ns, run, attempt)
    return len(found) == 2 and all(p["status"].get("phase") == "Running" for p in found)


@pytest.fixture(autouse=True)
def explain(kube_cluster: Any, namespace: str) -> Iterator[None]:
    """On a failure, what the namespace holds: the Jobs, Workloads, pods and events."""
    yield
    print(kube_cluster.kubectl_result("get", "cptruns,jobs,workloads,pods", "-n", namespace, "-o", "wide").stdout)
    print(kube_cluster.kubectl_result("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout[-6000:])


def admitted(kube: Any, ns: str, run: str) -> dict[str, Any]:
    return condition(status_of(kube, ns, run), "Admitted")


def test_without_kueue_a_queued_run_is_refused_with_a_clear_condition(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    # the test needs a cluster without Kueue: it runs before this module's `kueue` fixture, and no
    # other module installs Kueue's CRDs
    assert kube.kubectl_result("get", f"crd/workloads.{kq.GROUP}").returncode != 0, \
        "Kueue's CRDs are installed already: this test must run before anything starts Kueue"
    kube.apply(queued("nokueue", s3_bucket), namespace=namespace)
    cond = kube.wait_for(lambda: (c := condition(status_of(kube, namespace, "nokueue"), "SpecValid"))
                         .get("status") == "False" and c, "SpecValid=False", timeout=30)
    assert cond["reason"] == "KueueNotInstalled" and "no Kueue" in cond["message"]
    assert job_names(kube, namespace, "nokueue") == []


def test_two_gangs_against_quota_for_one_queue_instead_of_half_starting(
        kube_cluster: Any, operator: OperatorProcess, kueue: Kueue, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kueue.local_queue(namespace)
    kube.apply(queued("first", s3_bucket), namespace=namespace)
    kube.wait_for(lambda: running_pods(kube, namespace, "first", 1), "first's gang running", timeout=60)
    kube.wait_for(lambda: admitted(kube, namespace, "first").get("status") == "True", "first admitted", timeout=30)

    # its start deadline is shorter than its wait in the queue: it counts from the admission only
    kube.apply(queued("second", s3_bucket, resources={"startTimeoutSeconds": START_TIMEOUT_S}), namespace=namespace)
    applied = time.monotonic()
    waiting = kube.wait_for(lambda: (c := admitted(kube, namespace, "second")).get("reason") == "Pending" and c,
                            "second waiting with Kueue's reason", timeout=30)
    assert waiting["status"] == "False" and "insufficient" in waiting["message"], waiting
    job = kube.kubectl_json("get", "job", "second-a1", "-n", namespace)
    assert job["spec"]["suspend"] is True and pods(kube, namespace, "second") == []
    assert "startTime" not in job.get("status", {})  # the start clock has not begun
    table = kube.kubectl("get", "cptruns", "-n", namespace)
    assert "ADMISSION" in table and "Admitted" in table and "Pending" in table, table
    time.sleep(max(0.0, START_TIMEOUT_S + 5 - (time.monotonic() - applied)))
    status = status_of(kube, namespace, "second")
    assert status["phase"] == "Running", status
    assert condition(status, "Started")["message"] == "attempt 1: its Job has not started yet (it waits for Kueue " \
        "to admit it)", status

    kube.annotate_pods(namespace, "cpt.mlops.dev/run=first", "cpt-test/complete=true")
    kube.wait_for(lambda: running_pods(kube, namespace, "second", 1), "second's gang running once first is done",
                  timeout=60)
    kube.wait_for(lambda: admitted(kube, namespace, "second").get("status") == "True", "second admitted", timeout=30)
    kube.wait_for(lambda: condition(status_of(kube, namespace, "second"), "Started").get("status") == "True",
                  "second started", timeout=30)
    status = status_of(kube, namespace, "second")
    assert (status["restarts"], status["phase"]) == (0, "Running"), status


def test_a_preempted_run_resumes_from_its_last_checkpoint_without_spending_a_restart(
        kube_cluster: Any, operator: OperatorProcess, kueue: Kueue, namespace: str, s3_bucket: str,
        s3_server: Any) -> None:
    kube = kube_cluster
    kueue.local_queue(namespace)
    kueue.priority_class("cpt-low", 100)
    kueue.priority_class("cpt-high", 1000)
    # no restart to spare: an eviction counted as a failure would fail the run
    kube.apply(queued("low", s3_bucket, stopPolicy={"maxAttemptRestarts": 0},
                      resources={"priorityClass": "cpt-low"}), namespace=namespace)
    kube.wait_for(lambda: running_pods(kube, namespace, "low", 1), "low's gang running", timeout=60)
    saved = write_checkpoint(s3_server, s3_bucket, "low", 1, 20, {"legal.perplexity": 15.0,
                                                                  "general.perplexity": 10.0})

    kube.apply(queued("high", s3_bucket, resources={"priorityClass": "cpt-high"}), namespace=namespace)
    kube.wait_for(lambda: running_pods(kube, namespace, "high", 1), "high's gang running after preempting low",
                  timeout=90)
    status = kube.wait_for(lambda: (s := status_of(kube, namespace, "low")).get("attempt") == 2 and s,
                           "low's next attempt queued", timeout=60)
    assert (status["evictions"], status["restarts"], status["phase"]) == (1, 0, "Running")
    assert status["restoreFrom"] == saved
    assert admitted(kube, namespace, "low")["status"] == "False"
    assert pods(kube, namespace, "low") == [] and job_names(kube, namespace, "low") == ["low-a2"]
    reasons = {e["reason"]: e["message"] for e in events(kube, namespace, "low")}
    assert "Preempted" in reasons["Evicted"], reasons
    # the evicted attempt's Workload went with its Job: only the queued one is left
    kube.wait_for(lambda: [w["metadata"]["labels"].get(kq.LABEL_JOB_UID) for w in kueue.workloads(namespace)
                           if w["metadata"]["ownerReferences"][0]["name"].startswith("low-")
                           and not w["metadata"].get("deletionTimestamp")] ==
                  [kube.kubectl_json("get", "job", "low-a2", "-n", namespace)["metadata"]["uid"]],
                  "one Workload of low's", timeout=30)

    kube.annotate_pods(namespace, "cpt.mlops.dev/run=high", "cpt-test/complete=true")
    kube.wait_for(lambda: running_pods(kube, namespace, "low", 2), "low resumed once high is done", timeout=60)
    config = trainer_config(kube, namespace, "low-a2")
    assert config["restoreFrom"] == f"s3://{s3_bucket}/runs/low/{saved}" and config["restoreMode"] == "fullState"
    status = status_of(kube, namespace, "low")
    assert (status["restarts"], status["evictions"]) == (0, 1)
    kube.wait_for(lambda: admitted(kube, namespace, "low").get("status") == "True", "low admitted again",
                  timeout=30)


def test_a_gang_not_ready_in_time_is_evicted_and_requeued_without_spending_a_restart(
        kube_cluster: Any, operator: OperatorProcess, kueue: Kueue, namespace: str, s3_bucket: str) -> None:
    kube, node = kube_cluster, "gpu-h100-1"
    kueue.local_queue(namespace)
    kube.kubectl("cordon", node)  # Kueue has the quota, the scheduler has one node: half a gang
    try:
        kube.apply(queued("stuck", s3_bucket, stopPolicy={"maxAttemptRestarts": 0}), namespace=namespace)
        kube.wait_for(lambda: status_of(kube, namespace, "stuck").get("evictions", 0) >= 1,
                      "an eviction after waitForPodsReady.timeout", timeout=PODS_READY_TIMEOUT_S + 50)
        evicted = [e["message"] for e in events(kube, namespace, "stuck") if e["reason"] == "Evicted"]
        assert evicted and "PodsReadyTimeout" in evicted[0], evicted
    finally:
        kube.kubectl("uncordon", node)
    status = kube.wait_for(lambda: (s := status_of(kube, namespace, "stuck")).get("attempt", 0) >= 2
                           and running_pods(kube, namespace, "stuck", s["attempt"]) and s,
                           "a later attempt's whole gang running", timeout=90)
    assert (status["restarts"], status["phase"]) == (0, "Running") and status["evictions"] >= 1
    kube.wait_for(lambda: admitted(kube, namespace, "stuck").get("status") == "True", "admitted", timeout=30)


def test_a_gang_that_can_never_start_is_not_requeued_forever_but_fails_at_its_start_deadline(
        kube_cluster: Any, operator: OperatorProcess, kueue: Kueue, namespace: str, s3_bucket: str) -> None:
    """Every attempt is evicted by waitForPodsReady (half the gang cannot be scheduled) and resumed
    by a new one; the time each spent starting adds up (`status.startingSeconds`), so the run
    ends at its start deadline naming the cause instead of looping through evictions."""
    kube, node = kube_cluster, "gpu-h100-1"
    kueue.local_queue(namespace)
    kube.kubectl("cordon", node)
    began = time.monotonic()
    try:
        kube.apply(queued("never", s3_bucket, resources={"startTimeoutSeconds": START_TIMEOUT_S},
                          stopPolicy={"maxAttemptRestarts": 0}), namespace=namespace)
        status = kube.wait_for(lambda: (s := status_of(kube, namespace, "never")).get("phase") == "Failed" and s,
                               "the run failed at its start deadline", timeout=START_TIMEOUT_S + 90)
    finally:
        kube.kubectl("uncordon", node)
    assert status["evictions"] >= 1 and status["restarts"] == 0, status
    assert condition(status, "Failed")["reason"] == "StartTimeout", status
    assert "Kueue" in status["message"] and "before their trainers ran" in status["message"]
    assert "nodes are available" in status["message"], status["message"]  # the scheduler's cause
    assert job_names(kube, namespace, "never") == []  # the GPUs are let go
    print(f"a gang that cannot start: Failed (StartTimeout) {time.monotonic() - began:.0f} s after apply, "
          f"{status['evictions']} evictions, startTimeoutSeconds {START_TIMEOUT_S}")
