"""Before a Job exists the operator claims the run's checkpoint root and pins what the run may
restore: a root another run owns keeps the run from starting (CheckpointUriInUse), a pin the
store refuses holds the start (CheckpointsPinned=False) until a later pass succeeds.

The root is on the `memory_object_store` stand-in (`gs://` in memory): on a cluster the operator
reads and writes only object storage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pytest

from cpt_api.manifest import PINNED, RUN_RECORD
from cpt_api.status import ConditionType, Reason
from cpt_operator.kube.passes import reconcile_run
from tests.unit.kube.cases import RUN, spec_doc
from tests.unit.kube.test_memory_check import FakeKube, _condition, _runtime

TARGET = "attempt-001/step-00000050"
pytestmark = pytest.mark.usefixtures("memory_object_store")


def _root(tmp_path: Path) -> str:
    return f"gs://ckpt-{tmp_path.name}"


def _read(path: str) -> Any:
    return json.loads(fsspec.filesystem("gs").cat_file(path))


def _body(root: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec_doc(nodes=1, memory=None)  # nothing to plan: the base is not in the test's store
    del spec["resources"]["s3SecretRef"]  # read with the operator's identity (test_run_credentials)
    spec["checkpoint"]["uri"] = root
    body = {"metadata": {"name": RUN.name, "namespace": RUN.namespace, "uid": RUN.uid, "generation": 1,
                         "resourceVersion": "1"}, "spec": spec}
    if status is not None:
        body["status"] = status
    return body


def test_the_first_start_claims_the_root_for_the_run(tmp_path: Path) -> None:
    kube, events = FakeKube(_body(_root(tmp_path))), []
    reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name)
    assert len(kube.jobs()) == 1
    record = _read(f"{_root(tmp_path)}/{RUN_RECORD}")
    assert record == {"uid": RUN.uid, "name": RUN.name, "namespace": RUN.namespace}


def test_a_root_another_run_owns_is_refused_with_the_owner_named_and_no_job(tmp_path: Path) -> None:
    root = _root(tmp_path)
    fsspec.filesystem("gs").pipe(f"{root}/{RUN_RECORD}",
                                 json.dumps({"uid": "old-uid", "name": RUN.name, "namespace": RUN.namespace}).encode())
    kube, events = FakeKube(_body(root)), []
    rt = _runtime(kube, events)
    for _ in range(2):  # a second pass repeats nothing
        assert reconcile_run(rt, RUN.namespace, RUN.name) is None
    assert kube.jobs() == []
    cond = _condition(kube.body, ConditionType.spec_valid)
    assert (cond["status"], cond["reason"]) == ("False", Reason.checkpoint_uri_in_use.value)
    assert "old-uid" in cond["message"] and f"{RUN.namespace}/{RUN.name}" in cond["message"]
    assert [e[1] for e in events] == [Reason.checkpoint_uri_in_use.value]
    assert not fsspec.filesystem("gs").exists(f"{root}/{PINNED}")
    assert _read(f"{root}/{RUN_RECORD}")["uid"] == "old-uid"


def test_a_failed_pin_holds_the_next_attempt_and_is_retried(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import cpt_operator.kube.checkpoints as checkpoints

    root = _root(tmp_path)
    rolling_back = {"phase": "RollingBack", "attempt": 1, "restoreFrom": TARGET, "rollbacks": 1}
    kube, events = FakeKube(_body(root, rolling_back)), []
    rt = _runtime(kube, events)
    real_pin = checkpoints.pin

    def refused(*_: Any) -> None:
        raise PermissionError(13, "Access Denied", f"{root}/{PINNED}")

    monkeypatch.setattr(checkpoints, "pin", refused)  # the store refuses the write
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.jobs() == []
    cond = _condition(kube.body, ConditionType.checkpoints_pinned)
    assert (cond["status"], cond["reason"]) == ("False", Reason.pin_failed.value) and TARGET in cond["message"]
    assert kube.body["status"]["attempt"] == 1  # nothing recorded as started

    monkeypatch.setattr(checkpoints, "pin", real_pin)  # the store accepts it again
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["legal-7b-a2"]
    assert TARGET in _read(f"{root}/{PINNED}")["names"]
    assert _condition(kube.body, ConditionType.checkpoints_pinned)["status"] == "True"


class StoppingKube(FakeKube):
    """The fake with what a stop uses: annotations cleared, Jobs and pods deleted."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(body)
        self.deleted: list[str] = []

    def patch_annotations(self, namespace: str, name: str, annotations: dict[str, Any], version: str) -> str:
        for key, value in annotations.items():
            if value is None:
                self.body["metadata"].get("annotations", {}).pop(key, None)
        return version

    def delete_job(self, namespace: str, name: str) -> bool:
        self.deleted.append(name)
        self.created = [o for o in self.created if o["metadata"]["name"] != name]
        return True

    def delete_pods(self, namespace: str, selector: str, grace_s: int, live_only: bool = False) -> None:
        pass


def test_a_stop_that_saves_waits_for_its_pins_and_a_finished_run_does_not_rewrite_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cpt_operator.kube.checkpoints as checkpoints

    root = _root(tmp_path)
    rolling_back = {"phase": "RollingBack", "attempt": 1, "restoreFrom": TARGET, "rollbacks": 1}
    kube, events = StoppingKube(_body(root, rolling_back)), []
    rt = _runtime(kube, events)
    reconcile_run(rt, RUN.namespace, RUN.name)  # attempt 2 starts from TARGET, which is pinned
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["legal-7b-a2"]
    real_pin, writes = checkpoints.pin, []

    def refused(*_: Any) -> None:
        raise PermissionError(13, "Access Denied", f"{root}/{PINNED}")

    # the stored pins are lost meanwhile (the operator restarted: nothing known to be written),
    # and the store refuses them now; a person asks the run to stop
    rt.pinned.clear()
    monkeypatch.setattr(checkpoints, "pin", refused)
    kube.body["metadata"]["annotations"] = {"cpt.mlops.dev/stop": "true"}
    reconcile_run(rt, RUN.namespace, RUN.name)
    # the trainer would save on SIGTERM and prune by pins that are not there: the stop waits
    assert kube.deleted == [] and kube.body["status"]["phase"] == "Running"
    cond = _condition(kube.body, ConditionType.checkpoints_pinned)
    assert (cond["status"], cond["reason"]) == ("False", Reason.pin_failed.value)

    def counted(*args: Any) -> None:
        writes.append(args)
        real_pin(*args)

    monkeypatch.setattr(checkpoints, "pin", counted)
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.deleted == ["legal-7b-a2"] and kube.body["status"]["phase"] == "Stopped"
    for _ in range(3):  # later passes of the stopped run write nothing again
        reconcile_run(rt, RUN.namespace, RUN.name)
    assert len(writes) == 1, writes
