"""The operator plans memory before it creates an attempt's Job: a run that cannot fit its GPUs or
its pods' host memory gets SpecValid=False (WontFit) naming the fix and no Job; an unreadable base
does not block the run.

The operator reads bases and checkpoints only from object storage; here `gs://` is served by
fsspec's in-memory filesystem (the `memory_object_store` stand-in; e2e tests use the S3 server)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import fsspec
import pytest

from cpt_api.status import ConditionType, Reason
from cpt_operator.kube.builders import Object, RunRef
from cpt_operator.kube.passes import reconcile_run
from cpt_operator.kube.runtime import Runtime
from cpt_operator.kube.launcher import IndexedJobLauncher
from cpt_operator.kube.metrics import OperatorMetrics
from cpt_operator.kube.settings import Settings
from tests.unit.kube.cases import RUN, spec_doc
from tests.unit.policy.memory_cases import LLAMA3_8B_CONFIG


@pytest.fixture(autouse=True)
def object_store(memory_object_store: str) -> str:
    return memory_object_store


class FakeKube:
    """The client surface `reconcile_run` uses, over one CptRun held in memory."""

    def __init__(self, body: dict[str, Any]):
        self.body, self.created = body, list[Object]()

    def read_run(self, namespace: str, name: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.body))

    def children(self, run: RunRef, kinds: tuple[str, ...]) -> dict[str, list[Object]]:
        return {kind: [o for o in self.created if o["kind"] == kind] for kind in kinds}

    def ensure(self, obj: Object, owner: RunRef) -> bool:
        self.created.append(obj)
        return True

    def patch_status(self, run: RunRef, version: str, old: Mapping[str, Any], new: dict[str, Any]) -> str:
        self.body["status"] = new
        self.body["metadata"]["resourceVersion"] = str(int(version) + 1)
        return self.body["metadata"]["resourceVersion"]

    def jobs(self) -> list[Object]:
        return [o for o in self.created if o["kind"] == "Job"]


def _body(tmp_path: Path, config: dict[str, Any] | None, memory: str = "900Gi", **parallelism: Any) -> dict[str, Any]:
    base = f"gs://bases/{tmp_path.name}"
    if config is not None:
        fsspec.filesystem("gs").pipe(f"{base}/config.json", json.dumps(config).encode())
    spec = spec_doc(nodes=1, gpuMemory="80Gi", memory=memory)
    del spec["resources"]["s3SecretRef"]  # read with the operator's identity (test_run_credentials)
    spec["baseModel"]["uri"] = base
    spec["checkpoint"]["uri"] = f"gs://checkpoints/{tmp_path.name}"
    spec["packing"] = {"seqLen": 4096}
    spec["training"] = {"microBatchSize": 1, "parallelism": parallelism}
    return {"metadata": {"name": RUN.name, "namespace": RUN.namespace, "uid": RUN.uid, "generation": 1,
                         "resourceVersion": "1"}, "spec": spec}


def test_a_base_on_a_path_is_not_read_by_the_operator(tmp_path: Path) -> None:
    body = _body(tmp_path, LLAMA3_8B_CONFIG, strategy="ddp")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    body["spec"]["baseModel"]["uri"] = str(tmp_path)  # readable here, but not the operator's to read
    kube, events = FakeKube(body), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is not None
    planned = _condition(kube.body, ConditionType.memory_planned)
    assert (planned["status"], planned["reason"]) == ("False", Reason.plan_unavailable.value)
    assert "not object storage" in planned["message"]


def _runtime(kube: FakeKube, events: list[tuple[str, str, str]]) -> Runtime:
    settings = Settings()
    return Runtime(settings=settings, kube=kube, launcher=IndexedJobLauncher(settings),  # type: ignore[arg-type]
                   prometheus=None, metrics=OperatorMetrics(),
                   emit=lambda body, type_, reason, message: events.append((type_, reason, message)))


def _condition(body: Mapping[str, Any], type_: ConditionType) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == type_.value)


def test_a_run_that_cannot_fit_is_refused_with_the_fix_and_no_job(tmp_path: Path) -> None:
    kube, events = FakeKube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="ddp")), []
    rt = _runtime(kube, events)
    for _ in range(2):  # a second pass repeats nothing
        assert reconcile_run(rt, RUN.namespace, RUN.name) is None
    valid = _condition(kube.body, ConditionType.spec_valid)
    assert (valid["status"], valid["reason"]) == ("False", Reason.wont_fit.value)
    assert "smallest fix: set training.parallelism.strategy: fsdp" in valid["message"]
    assert kube.jobs() == []
    assert [(t, r) for t, r, _ in events] == [("Warning", "WontFit")]


def test_a_pod_whose_disk_cannot_stage_a_save_is_refused_before_a_failed_upload_would(tmp_path: Path) -> None:
    body = _body(tmp_path, LLAMA3_8B_CONFIG, strategy="fsdp")
    body["spec"]["resources"]["scratch"] = "20Gi"  # checkpoints go to gs://: each save is staged first
    kube, events = FakeKube(body), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is None
    valid = _condition(kube.body, ConditionType.spec_valid)
    assert (valid["status"], valid["reason"]) == ("False", Reason.wont_fit.value)
    assert valid["message"].startswith("scratch disk per pod 90.7 GiB of 20.0 GiB does not fit")
    assert "smallest fix: set resources.scratch: 91Gi" in valid["message"] and kube.jobs() == []


def test_a_pod_whose_host_memory_cannot_fit_is_refused_naming_host_memory(tmp_path: Path) -> None:
    kube, events = FakeKube(_body(tmp_path, LLAMA3_8B_CONFIG, memory="64Gi", strategy="fsdp")), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is None
    valid = _condition(kube.body, ConditionType.spec_valid)
    assert (valid["status"], valid["reason"]) == ("False", Reason.wont_fit.value)
    assert valid["message"].startswith("host memory per pod 112.2 GiB of 64.0 GiB does not fit")
    assert "largest a rank: staging 11.2 GiB" in valid["message"]
    assert "smallest fix: set checkpoint.asynchronous: false" in valid["message"]
    assert kube.body["status"]["message"].startswith("not started: host memory per pod")
    assert kube.jobs() == []
    assert [(t, r) for t, r, _ in events] == [("Warning", "WontFit")]


def test_a_run_that_fits_starts_and_records_the_plan(tmp_path: Path) -> None:
    kube, events = FakeKube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="fsdp")), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is not None
    assert len(kube.jobs()) == 1
    planned = _condition(kube.body, ConditionType.memory_planned)
    assert (planned["status"], planned["reason"]) == ("True", "Fits")
    assert planned["message"] == "per-GPU 59.2 GiB of 80.0 GiB; host memory per pod 112.2 GiB of 900.0 GiB"


def test_an_unreadable_config_does_not_block_the_run(tmp_path: Path) -> None:
    kube, events = FakeKube(_body(tmp_path, None, strategy="ddp")), []
    assert reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is not None
    assert len(kube.jobs()) == 1
    planned = _condition(kube.body, ConditionType.memory_planned)
    assert (planned["status"], planned["reason"]) == ("False", Reason.plan_unavailable.value)
    assert "config.json" in planned["message"]
    assert [(t, r) for t, r, _ in events] == [("Warning", "PlanUnavailable"), ("Normal", "AttemptStarted")]


def test_config_json_is_read_once_per_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cpt_operator.kube.start_probe as start_probe

    reads: list[str] = []
    real = start_probe.read_shape
    monkeypatch.setattr(start_probe, "read_shape", lambda base: reads.append(base.uri) or real(base))
    kube, events = FakeKube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="ddp")), []
    rt = _runtime(kube, events)
    for _ in range(3):
        reconcile_run(rt, RUN.namespace, RUN.name)
    kube.body["metadata"]["generation"] = 2
    kube.body["spec"]["training"]["parallelism"]["strategy"] = "fsdp"
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert len(reads) == 2
    assert len(kube.jobs()) == 1  # the fixed spec starts

