"""A run that names `resources.s3SecretRef` has its storage read and written by the operator
with that Secret's keys; a Secret the operator cannot use keeps the run from starting, with a
condition naming the Secret and why, and its storage is not touched with any other identity.

`s3://` is served here by fsspec's in-memory filesystem that records the keys each filesystem
instance was made with (the e2e test in test_checkpoint_s3.py uses the real S3 server)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from kubernetes.client.exceptions import ApiException

from cpt_api.manifest import RUN_RECORD
from cpt_api.status import ConditionType, Reason
from cpt_api.storage import RUN_CREDENTIALS
from cpt_operator.kube.builders import labels
from cpt_operator.kube.handlers import _watched
from cpt_operator.kube.passes import reconcile_run
from tests.unit.kube.cases import RUN, spec_doc
from tests.unit.kube.test_memory_check import FakeKube, _condition, _runtime

SECRET = {"AWS_ACCESS_KEY_ID": "team-ml", "AWS_SECRET_ACCESS_KEY": "team-ml-secret"}


class RecordingStore(MemoryFileSystem):
    """s3:// in memory; `keys` lists the access key of every filesystem instance made."""

    protocol = ("s3", "s3a")
    keys: list[str | None] = []

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        RecordingStore.keys.append(options.get("key"))

    @classmethod
    def _strip_protocol(cls, path: str) -> str:  # type: ignore[override]
        return super()._strip_protocol(path.removeprefix("s3://").removeprefix("s3a://"))


@pytest.fixture(autouse=True)
def store() -> Iterator[None]:
    import sys

    fsspec.register_implementation("s3", RecordingStore, clobber=True)
    RecordingStore.clear_instance_cache()
    RecordingStore.keys = []
    yield
    sys.modules["fsspec.registry"]._registry.pop("s3", None)


class Kube(FakeKube):
    def __init__(self, body: dict[str, Any], secret: dict[str, str] | ApiException):
        super().__init__(body)
        self.secret = secret

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        assert (namespace, name) == (RUN.namespace, "s3-creds")
        if isinstance(self.secret, ApiException):
            raise self.secret
        return self.secret


def _body(root: str) -> dict[str, Any]:
    spec = spec_doc(nodes=1, gpuMemory="80Gi")  # the memory plan reads the base's config.json
    spec["checkpoint"]["uri"] = root
    return {"metadata": {"name": RUN.name, "namespace": RUN.namespace, "uid": RUN.uid, "generation": 1,
                         "resourceVersion": "1"}, "spec": spec}


def test_the_runs_storage_is_claimed_and_listed_with_the_runs_own_keys(tmp_path: Path) -> None:
    root = f"s3://ckpt-{tmp_path.name}"
    kube, events = Kube(_body(root), SECRET), []
    for _ in range(2):
        reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name)
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["legal-7b-a1"]
    assert json.loads(fsspec.filesystem("s3", key="team-ml").cat_file(f"{root}/{RUN_RECORD}"))["uid"] == RUN.uid
    assert "s3://models/base/config.json" in _condition(kube.body, ConditionType.memory_planned)["message"]
    assert set(RecordingStore.keys) == {"team-ml"}  # no instance with the operator's identity
    assert RUN_CREDENTIALS.get() is None  # nothing of the run's pass is left for the next one


@pytest.mark.parametrize("secret, cause", [
    (ApiException(status=403, reason="Forbidden"), "the operator may not read it (grant it `get` on Secrets"),
    (ApiException(status=404, reason="Not Found"), "it does not exist"),
    ({"AWS_ACCESS_KEY_ID": "team-ml"}, "has no AWS_SECRET_ACCESS_KEY"),
], ids=["the operator may not read Secrets", "no such Secret", "a Secret without the secret key"])
def test_a_secret_the_operator_cannot_use_keeps_the_run_from_starting(
        tmp_path: Path, secret: dict[str, str] | ApiException, cause: str) -> None:
    kube, events = Kube(_body(f"s3://ckpt-{tmp_path.name}"), secret), []
    rt = _runtime(kube, events)
    for _ in range(2):  # a second pass repeats nothing
        assert reconcile_run(rt, RUN.namespace, RUN.name) is None
    cond = _condition(kube.body, ConditionType.spec_valid)
    assert (cond["status"], cond["reason"]) == ("False", Reason.s3_secret_unreadable.value)
    assert f"Secret {RUN.namespace}/s3-creds (resources.s3SecretRef)" in cond["message"] and cause in cond["message"]
    assert kube.jobs() == [] and RecordingStore.keys == []  # the store was not touched at all
    assert [(t, r) for t, r, _ in events] == [("Warning", Reason.s3_secret_unreadable.value)]

    kube.secret = SECRET  # the Secret is created or the grant given: the next pass starts the run
    assert reconcile_run(rt, RUN.namespace, RUN.name) is not None
    assert len(kube.jobs()) == 1 and _condition(kube.body, ConditionType.spec_valid)["status"] == "True"


def test_s3_keys_do_not_open_a_checkpoint_root_on_another_store(tmp_path: Path, memory_object_store: str) -> None:
    kube, events = Kube(_body(f"gs://ckpt-{tmp_path.name}"), SECRET), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is None
    cond = _condition(kube.body, ConditionType.spec_valid)
    assert cond["reason"] == Reason.s3_secret_unreadable.value and "is not on S3" in cond["message"]
    assert kube.jobs() == []


class StartingKube(Kube):
    """The Secret goes after the attempt started: the kubelet cannot build the trainer's
    environment, and the operator cannot read the run's storage."""

    def delete_job(self, namespace: str, name: str) -> bool:
        self.created = [o for o in self.created if o["kind"] != "Job"]
        return True

    def delete_pods(self, namespace: str, selector: str, grace_s: int, live_only: bool = False) -> None:
        self.created = [o for o in self.created if o["kind"] != "Pod"]

    def job_started(self, ago_s: float) -> None:
        start = datetime.now(timezone.utc) - timedelta(seconds=ago_s)
        self.jobs()[0]["status"] = {"startTime": start.strftime("%Y-%m-%dT%H:%M:%SZ")}
        waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}
        self.created = [o for o in self.created if o["kind"] != "Pod"] + [{
            "kind": "Pod", "metadata": {"name": "legal-7b-a1-0-abcde", "labels": labels(RUN, 1)},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": waiting}}]}}]


def test_a_secret_gone_after_the_start_still_ends_the_stuck_attempt_at_its_deadline(tmp_path: Path) -> None:
    doc = _body(f"s3://ckpt-{tmp_path.name}")
    doc["spec"]["resources"] |= {"nodes": 1, "startTimeoutSeconds": 60}
    kube, events = StartingKube(doc, SECRET), []
    rt = _runtime(kube, events)
    reconcile_run(rt, RUN.namespace, RUN.name)
    RecordingStore.clear_instance_cache()  # any later access to the store makes a new instance
    reads = len(RecordingStore.keys)
    kube.secret = ApiException(status=404, reason="Not Found")
    kube.job_started(ago_s=5)
    for _ in range(2):  # a second pass repeats nothing
        reconcile_run(rt, RUN.namespace, RUN.name)
    assert _condition(kube.body, ConditionType.spec_valid)["reason"] == Reason.s3_secret_unreadable.value
    started = _condition(kube.body, ConditionType.started)
    assert (started["reason"], kube.body["status"]["phase"]) == (Reason.container_config_error.value, "Running")
    assert 'CreateContainerConfigError: secret "s3-creds" not found' in started["message"]
    assert [r for _, r, _ in events][-2:] == [Reason.s3_secret_unreadable.value, Reason.container_config_error.value]

    kube.job_started(ago_s=61)
    watched = {kind: [_watched(o) for o in kube.created if o["kind"] == kind] for kind in ("Job", "Pod")}
    reconcile_run(rt, RUN.namespace, RUN.name, watched=watched)  # a timer pass: it acts on fresh reads
    assert kube.body["status"]["phase"] == "Failed" and kube.jobs() == []
    assert _condition(kube.body, ConditionType.failed)["reason"] == Reason.start_timeout.value
    assert 'secret "s3-creds" not found' in kube.body["status"]["message"]
    assert len(RecordingStore.keys) == reads  # the storage was not touched without the run's keys


def _tenancy_runtime(kube: Kube, events: list[Any]) -> Any:
    from dataclasses import replace

    from cpt_api.tenancy import TenancyPolicy
    from tests.tenancy_cases import POLICY

    rt = _runtime(kube, events)
    rt.settings = replace(rt.settings, tenancy=TenancyPolicy.model_validate({**POLICY, "secrets": ["s3-creds"]}))
    return rt


def test_a_secret_naming_an_endpoint_outside_the_allow_list_is_never_connected_to(tmp_path: Path) -> None:
    secret = {**SECRET, "AWS_ENDPOINT_URL": "http://10.0.0.9:9000/internal"}
    kube, events = Kube(_body(f"s3://ckpt-{tmp_path.name}"), secret), []
    rt = _tenancy_runtime(kube, events)
    for _ in range(2):
        assert reconcile_run(rt, RUN.namespace, RUN.name) is None
    cond = _condition(kube.body, ConditionType.spec_valid)
    assert (cond["status"], cond["reason"]) == ("False", Reason.not_allowed.value)
    assert "names an S3 endpoint that is not allowed (allowed: https://s3.team-a.example)" in cond["message"]
    assert "10.0.0.9" not in json.dumps(kube.body["status"]) + json.dumps(events)  # the host is not echoed
    assert kube.jobs() == [] and RecordingStore.keys == []
    assert [(t, r) for t, r, _ in events] == [("Warning", Reason.not_allowed.value)]


def test_a_run_stored_before_the_policy_is_not_started_outside_it(tmp_path: Path) -> None:
    body = _body(f"s3://ckpt-{tmp_path.name}")
    body["spec"]["resources"]["image"] = "docker.io/someone/trainer:latest"
    kube, events = Kube(body, {**SECRET, "AWS_ENDPOINT_URL": "https://s3.team-a.example"}), []
    assert reconcile_run(_tenancy_runtime(kube, events), RUN.namespace, RUN.name) is None
    cond = _condition(kube.body, ConditionType.spec_valid)
    assert cond["reason"] == Reason.not_allowed.value
    assert "resources.image docker.io/someone/trainer:latest" in cond["message"]
    assert "nodeSelector pool=h100 is not allowed" in cond["message"]  # every refusal is named at once
    assert kube.jobs() == [] and kube.body["status"]["message"].startswith("not started: ")
