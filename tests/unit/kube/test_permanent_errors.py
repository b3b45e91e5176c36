"""A reconcile pass meets errors that no retry fixes (an object the API server refuses) and
requests that must not be lost (a one-shot annotation set while a pass runs, a resume)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pytest

from cpt_api.status import ConditionType, Reason
from cpt_operator.kube.builders import Object, RunRef
from cpt_operator.kube.client import Conflict, Rejected
from cpt_operator.kube.passes import reconcile_run
from cpt_operator.kube.runtime import Runtime
from cpt_operator.kube.launcher import IndexedJobLauncher
from cpt_operator.kube.metrics import OperatorMetrics
from cpt_operator.kube.settings import ANNOTATION_RESUME, ANNOTATION_ROLLBACK, ANNOTATION_STOP, Settings
from tests.unit.kube.cases import RUN, spec_doc


class FakeKube:
    """One CptRun in memory, with resourceVersions checked as the API server checks them; a Job
    asking for a cpu quantity that is not one is refused, as the API server refuses it."""

    def __init__(self, body: dict[str, Any]):
        self.body, self.created, self.sent = body, list[Object](), 0

    def read_run(self, namespace: str, name: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.body))

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.created if o["kind"] == "Job" and o["metadata"]["name"] == name), None)

    def pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        return []

    def children(self, run: RunRef, kinds: tuple[str, ...]) -> dict[str, list[Object]]:
        return {kind: [o for o in self.created if o["kind"] == kind] for kind in kinds}

    def ensure(self, obj: Object, owner: RunRef) -> bool:
        self.sent += 1
        if obj["kind"] == "Job":
            cpu = obj["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("cpu", "1")
            if not cpu.isdigit():
                raise Rejected(f'Job {obj["metadata"]["name"]}: resources.limits[cpu]: Invalid value: "{cpu}"')
        self.created.append(obj)
        return True

    def _bump(self, version: str | None) -> str:
        if version is not None and version != self.body["metadata"]["resourceVersion"]:
            raise Conflict("stale resourceVersion")
        self.body["metadata"]["resourceVersion"] = str(int(self.body["metadata"]["resourceVersion"]) + 1)
        return str(self.body["metadata"]["resourceVersion"])

    def patch_status(self, run: RunRef, version: str, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        self._bump(version)
        self.body["status"] = new

    def patch_annotations(self, namespace: str, name: str, annotations: Mapping[str, str | None],
                          resource_version: str | None = None) -> str:
        version = self._bump(resource_version)
        current = self.body["metadata"].setdefault("annotations", {})
        for key, value in annotations.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        return version

    def delete_job(self, namespace: str, name: str) -> bool:
        return True

    def delete(self, namespace: str, kind: str, name: str) -> bool:
        before = len(self.created)
        self.created = [o for o in self.created if (o["kind"], o["metadata"]["name"]) != (kind, name)]
        return len(self.created) < before

    def delete_pods(self, namespace: str, selector: str, grace_s: int, live_only: bool = False) -> None:
        pass

    def jobs(self) -> list[str]:
        return [o["metadata"]["name"] for o in self.created if o["kind"] == "Job"]


pytestmark = pytest.mark.usefixtures("memory_object_store")


def body(tmp_path: Path, **resources: Any) -> dict[str, Any]:
    # no pod memory to plan against: the base is not in the test's store (test_memory_check plans)
    spec = spec_doc(**{"memory": None, **resources})
    spec["checkpoint"]["uri"] = f"gs://checkpoints/{tmp_path.name}"  # the memory_object_store stand-in
    del spec["resources"]["s3SecretRef"]  # read with the operator's identity (test_run_credentials)
    return {"metadata": {"name": RUN.name, "namespace": RUN.namespace, "uid": RUN.uid, "generation": 1,
                         "resourceVersion": "1"}, "spec": spec}


def runtime(kube: FakeKube, events: list[tuple[str, str]] | None = None) -> Runtime:
    settings = Settings()
    sink = events if events is not None else []
    return Runtime(settings=settings, kube=kube, launcher=IndexedJobLauncher(settings),  # type: ignore[arg-type]
                   prometheus=None, metrics=OperatorMetrics(),
                   emit=lambda body, type_, reason, message: sink.append((type_, reason)))


def spec_valid(kube: FakeKube) -> dict[str, Any]:
    return next(c for c in kube.body["status"]["conditions"] if c["type"] == ConditionType.spec_valid.value)


def test_an_object_the_api_server_refuses_is_reported_and_not_sent_again_until_the_spec_changes(tmp_path):
    kube, events = FakeKube(body(tmp_path, cpu="lots")), []
    rt = runtime(kube, events)
    for _ in range(3):
        assert reconcile_run(rt, RUN.namespace, RUN.name) is None
    cond = spec_valid(kube)
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("False", Reason.invalid_object.value, 1)
    assert 'Invalid value: "lots"' in cond["message"]
    assert kube.sent == 3  # ConfigMap, Service, the refused Job: once, not on every pass
    assert kube.body["status"]["message"].startswith("not started: ")
    assert events == [("Warning", Reason.invalid_object.value)]

    kube.body["spec"]["resources"]["cpu"] = "90"  # the user fixes the spec
    kube.body["metadata"]["generation"] = 2
    assert reconcile_run(rt, RUN.namespace, RUN.name) is not None
    assert kube.jobs() == ["legal-7b-a1"]
    assert (spec_valid(kube)["status"], kube.body["status"]["phase"]) == ("True", "Running")


def test_a_trainer_config_too_big_for_a_config_map_is_reported_without_an_api_call(tmp_path):
    doc = body(tmp_path)
    doc["spec"]["tokenizer"] = {"extend": {"terms": [f"term-{i:06d}-" + "x" * 40 for i in range(30_000)]}}
    kube = FakeKube(doc)
    assert reconcile_run(runtime(kube), RUN.namespace, RUN.name) is None
    assert kube.sent == 0
    assert spec_valid(kube)["reason"] == Reason.invalid_object.value
    assert "ConfigMap holds at most" in spec_valid(kube)["message"]


def test_a_request_made_while_a_pass_runs_is_not_cleared_unseen(tmp_path):
    doc = body(tmp_path)
    doc["metadata"]["annotations"] = {ANNOTATION_ROLLBACK: "base"}
    kube = FakeKube(doc)
    rt = runtime(kube)
    reconcile_run(rt, RUN.namespace, RUN.name)  # attempt 1 starts
    kube.body["metadata"]["annotations"] = {ANNOTATION_ROLLBACK: "base"}
    real_read = kube.read_run

    def read_then_user_changes_it(namespace: str, name: str) -> dict[str, Any]:
        seen = real_read(namespace, name)
        kube.patch_annotations(namespace, name, {ANNOTATION_ROLLBACK: "attempt-001/step-00000050"})
        return seen

    kube.read_run = read_then_user_changes_it  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.body["metadata"]["annotations"] == {ANNOTATION_ROLLBACK: "attempt-001/step-00000050"}


def test_a_resume_request_continues_a_stopped_run_and_is_cleared(tmp_path):
    doc = body(tmp_path)
    doc["metadata"]["annotations"] = {ANNOTATION_STOP: "true"}
    kube = FakeKube(doc)
    rt = runtime(kube)
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.body["status"]["phase"] == "Stopped"
    kube.body["metadata"]["annotations"] = {ANNOTATION_RESUME: "true"}  # what `cptctl resume` leaves
    reconcile_run(rt, RUN.namespace, RUN.name)
    status = kube.body["status"]
    assert (status["phase"], status["attempt"]) == ("Running", 1)
    assert kube.jobs() == ["legal-7b-a1"]
    assert kube.body["metadata"]["annotations"] == {}
