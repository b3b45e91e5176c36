"""Passes of `reconcile_run` over an attempt whose pods do not start: the Started condition and an
event name the cause from the pods' status, and at the start deadline the Job and its pods are
deleted and the run fails (StartTimeout) with no restart. Pods are written here in the kubelet's
shapes (tests/e2e/test_start_failures.py has a real kubelet write them)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from cpt_api.status import ConditionType, Reason
from cpt_operator.kube.builders import Object, labels
from cpt_operator.kube.passes import reconcile_run
from tests.unit.kube.cases import RUN
from tests.unit.kube.test_permanent_errors import FakeKube, body, runtime

pytestmark = pytest.mark.usefixtures("memory_object_store")
JOB = "legal-7b-a1"


class Kube(FakeKube):
    """Deletes what the operator deletes; the test plays the Job controller and the kubelet."""

    def __init__(self, doc: dict[str, Any]):
        super().__init__(doc)
        self.deleted: list[str] = []

    def delete_job(self, namespace: str, name: str) -> bool:
        self.deleted.append(f"job/{name}")
        return self.delete(namespace, "Job", name)

    def delete_pods(self, namespace: str, selector: str, grace_s: int, live_only: bool = False) -> None:
        self.deleted.append(f"pods/{selector}")
        self.created = [o for o in self.created if o["kind"] != "Pod"]

    def job_started(self, ago_s: float) -> None:
        start = datetime.now(timezone.utc) - timedelta(seconds=ago_s)
        [job] = [o for o in self.created if o["kind"] == "Job"]
        job["status"] = {"startTime": start.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def pod(self, index: int, state: dict[str, Any], phase: str = "Pending") -> None:
        self.created = [o for o in self.created if o["metadata"]["name"] != f"{JOB}-{index}-abcde"]
        pod: Object = {"kind": "Pod", "metadata": {"name": f"{JOB}-{index}-abcde", "namespace": RUN.namespace,
                                                   "labels": labels(RUN, 1)},
                       "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}
        self.created.append(pod)

    def conditions(self) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.body["status"]["conditions"]}


NEVER_PULL = {"waiting": {"reason": "ErrImageNeverPull",
                          "message": 'Container image "cpt/trainer:v9" is not present with pull policy of Never'}}


def test_an_image_that_never_comes_fails_the_run_at_the_deadline_and_frees_the_pods(tmp_path: Path) -> None:
    kube, events = Kube(body(tmp_path, nodes=1, startTimeoutSeconds=60)), []
    rt = runtime(kube, events)
    reconcile_run(rt, RUN.namespace, RUN.name)
    kube.job_started(ago_s=5)
    kube.pod(0, NEVER_PULL)
    reconcile_run(rt, RUN.namespace, RUN.name)
    started = kube.conditions()[ConditionType.started.value]
    assert (started["status"], started["reason"]) == ("False", Reason.image_pull_failed.value)
    assert f"pod {JOB}-0-abcde: ErrImageNeverPull: Container image" in started["message"]
    assert events[-1] == ("Warning", Reason.image_pull_failed.value)
    assert kube.body["status"]["phase"] == "Running" and kube.deleted == []

    kube.job_started(ago_s=61)
    reconcile_run(rt, RUN.namespace, RUN.name)
    status = kube.body["status"]
    assert status["phase"] == "Failed" and status.get("restarts", 0) == 0
    assert status["message"].startswith(f"attempt 1 did not start within 60 s: pod {JOB}-0-abcde: ErrImageNeverPull")
    assert kube.conditions()[ConditionType.failed.value]["reason"] == Reason.start_timeout.value
    assert kube.deleted == [f"job/{JOB}", f"pods/cpt.mlops.dev/run={RUN.name},cpt.mlops.dev/attempt=1"]
    assert events[-1] == ("Warning", Reason.start_timeout.value)
    reconcile_run(rt, RUN.namespace, RUN.name)  # a finished run starts nothing again
    assert kube.jobs() == [] and kube.body["status"]["attempt"] == 1


def test_pods_that_start_in_time_mark_the_attempt_started(tmp_path: Path) -> None:
    kube, events = Kube(body(tmp_path, nodes=2, startTimeoutSeconds=60)), []
    rt = runtime(kube, events)
    reconcile_run(rt, RUN.namespace, RUN.name)
    kube.job_started(ago_s=5)
    kube.pod(0, {"running": {"startedAt": "2026-12-01T10:00:00Z"}}, "Running")
    reconcile_run(rt, RUN.namespace, RUN.name)
    started = kube.conditions()[ConditionType.started.value]
    assert (started["reason"], started["message"][:30]) == (Reason.starting.value, "attempt 1: 1 of 2 pods exist (")
    kube.pod(1, {"running": {"startedAt": "2026-12-01T10:00:01Z"}}, "Running")
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.conditions()[ConditionType.started.value]["status"] == "True"
    kube.job_started(ago_s=3600)  # long after the deadline: the attempt had started, nothing happens
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.body["status"]["phase"] == "Running" and kube.deleted == []
    assert [r for _, r in events] == ["AttemptStarted"]
