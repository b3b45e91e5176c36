"""Separate evaluations on a cluster: the operator's pass creates one Job per checkpoint (the
base first), reads their state back, deletes a Job once its record is read and names one that
failed. Through `reconcile_run` with an in-memory API (the real one: tests/e2e/test_separate_evaluation.py)
and `gs://` served by fsspec's memory filesystem (the `memory_object_store` stand-in)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from cpt_api.events import Evaluated
from cpt_api.manifest import eval_record_name
from cpt_api.status import ConditionType
from cpt_operator.kube.builders import Object, RunRef
from cpt_operator.kube.evaluations import build, evaluation_name, runs, target_of
from cpt_operator.kube.passes import reconcile_run
from cpt_operator.kube.settings import Settings
from cpt_operator.reconcile import Evaluate
from tests.unit.kube.cases import RUN, build_spec
from tests.unit.kube.test_memory_check import FakeKube, _body, _condition, _runtime


@pytest.fixture(autouse=True)
def object_store(memory_object_store: str) -> str:
    return memory_object_store


class Kube(FakeKube):
    def __init__(self, body: dict[str, Any]):
        super().__init__(body)
        self.deleted: list[tuple[str, str]] = []

    def delete_job(self, namespace: str, name: str) -> bool:
        return self.delete(namespace, "Job", name)

    def delete(self, namespace: str, kind: str, name: str) -> bool:
        self.deleted.append((kind, name))
        before = len(self.created)
        self.created = [o for o in self.created if (o["kind"], o["metadata"]["name"]) != (kind, name)]
        return len(self.created) < before

    def ensure(self, obj: Object, owner: RunRef) -> bool:
        if any((o["kind"], o["metadata"]["name"]) == (obj["kind"], obj["metadata"]["name"]) for o in self.created):
            return False
        return super().ensure(obj, owner)

    def job(self, name: str) -> Object:
        return next(o for o in self.created if o["kind"] == "Job" and o["metadata"]["name"] == name)


def _separate(tmp_path: Path) -> dict[str, Any]:
    body = _body(tmp_path, None)
    body["spec"]["evaluation"]["placement"] = "separate"
    return body


def _record(root: str, step: int, base: bool) -> None:
    record = Evaluated(step=step, tokens=0, metrics={"legal.perplexity": 9.0, "general.perplexity": 7.0},
                       is_base=base, time=time.time())
    fsspec.filesystem("gs").pipe(f"{root}/attempt-001/{eval_record_name(step)}",
                                 record.model_dump_json(by_alias=True).encode())


def test_the_evaluation_job_is_a_trainer_pod_that_evaluates_and_belongs_to_the_run() -> None:
    spec = build_spec(queue="team-a")  # 8 GPUs a pod: 8 evaluator ranks
    [cm, job] = build(RUN, spec, Evaluate("attempt-002/step-00000150", 2), Settings())
    name = evaluation_name(RUN.name, "attempt-002/step-00000150")
    assert cm["metadata"]["name"] == job["metadata"]["name"] == name and name.endswith("-e2-150")
    assert job["metadata"]["ownerReferences"][0]["uid"] == RUN.uid
    assert target_of(job) == "attempt-002/step-00000150" and "cpt.mlops.dev/attempt" not in job["metadata"]["labels"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"]
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["completions"] == 1
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][-4:] == ["--config", "/etc/cpt/trainer-config.json", "--evaluate", "step-00000150"]
    assert "--nproc-per-node=8" in container["command"] and "--standalone" in container["command"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["volumes"][0]["configMap"]["name"] == name
    config = json.loads(cm["data"]["trainer-config.json"])
    assert config["checkpointUri"].endswith("/attempt-002") and config["attempt"] == 2


def test_a_pass_starts_the_base_evaluation_reads_it_back_and_removes_its_job(tmp_path: Path) -> None:
    body = _separate(tmp_path)
    kube, events = Kube(body), []
    rt = _runtime(kube, events)
    reconcile_run(rt, RUN.namespace, RUN.name)
    base_job = evaluation_name(RUN.name, "base")
    assert {j["metadata"]["name"] for j in kube.jobs()} == {f"{RUN.name}-a1", base_job}
    assert _condition(kube.body, ConditionType.evaluated)["reason"] == "Evaluating"
    reconcile_run(rt, RUN.namespace, RUN.name)  # running: nothing twice
    assert len(kube.jobs()) == 2

    # the Job completes: until its record is read it still counts (not started again) ...
    kube.job(base_job)["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.job(base_job) and ("Job", base_job) not in kube.deleted
    # ... and once it is, the baseline is the run's and the Job goes
    _record(body["spec"]["checkpoint"]["uri"], 0, base=True)
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert kube.body["status"]["baseMetrics"] == {"legal.perplexity": 9.0, "general.perplexity": 7.0}
    assert ("Job", base_job) in kube.deleted and ("ConfigMap", base_job) in kube.deleted
    assert _condition(kube.body, ConditionType.evaluated)["status"] == "True"


def test_a_failed_evaluation_job_is_named_with_its_pods_exit() -> None:
    job = build(RUN, build_spec(), Evaluate("base", 1), Settings())[1]
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    pod = {"metadata": {"name": "x-ebase-abcde", "labels": dict(job["spec"]["template"]["metadata"]["labels"])},
           "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    found, completed = runs([job], [pod])
    assert not completed and found["base"].state == "failed"
    assert "OOMKilled" in found["base"].message and "137" in found["base"].message
