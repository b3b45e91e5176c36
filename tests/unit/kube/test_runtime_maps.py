"""The operator keeps per-run caches only while a run can still change: a finished run's
entries go at its last pass, a deleted run's (lock included) when its finalizer runs."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cpt_operator.kube.handlers import on_delete
from cpt_operator.kube.passes import reconcile_run
from tests.unit.kube.cases import RUN
from tests.unit.kube.test_memory_check import LLAMA3_8B_CONFIG, FakeKube, _body, _runtime

pytestmark = pytest.mark.usefixtures("memory_object_store")


class Kube(FakeKube):
    def run_jobs(self, run: object) -> list[str]:
        return [j["metadata"]["name"] for j in self.jobs()]

    def delete_job(self, namespace: str, name: str) -> bool:
        self.created = [o for o in self.created if not (o["kind"] == "Job" and o["metadata"]["name"] == name)]
        return True


def per_run(rt: object) -> dict[str, set[str]]:
    return {m: set(getattr(rt, m)) for m in ("caches", "pinned", "shapes", "manifests")}


def test_a_finished_run_leaves_nothing_behind_in_the_runtime(tmp_path: Path) -> None:
    kube = Kube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="fsdp"))
    rt = _runtime(kube, [])
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert per_run(rt) == {"caches": {RUN.uid}, "pinned": set(), "shapes": {RUN.uid}, "manifests": {RUN.uid}}
    [job] = kube.jobs()
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    plan = reconcile_run(rt, RUN.namespace, RUN.name)
    assert plan is not None and plan.status.phase.value == "Succeeded"
    assert per_run(rt) == {"caches": set(), "pinned": set(), "shapes": set(), "manifests": set()}


def test_a_deleted_run_leaves_nothing_behind_in_the_runtime(tmp_path: Path) -> None:
    kube = Kube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="fsdp"))
    rt = _runtime(kube, [])
    reconcile_run(rt, RUN.namespace, RUN.name)
    assert rt.locks
    on_delete(body=kube.body, namespace=RUN.namespace, name=RUN.name, memo=SimpleNamespace(runtime=rt))
    assert per_run(rt) == {"caches": set(), "pinned": set(), "shapes": set(), "manifests": set()}
    assert rt.locks == {} and kube.jobs() == []


def test_a_finished_run_is_polled_rarely_until_someone_asks_to_resume_it() -> None:
    from cpt_operator.kube.handlers import settled
    from cpt_operator.kube.settings import ANNOTATION_RESUME

    assert not settled({"phase": "Running"}, {})
    assert settled({"phase": "Stopped"}, {}) and settled({"phase": "Succeeded"}, None)
    # the resumed run may wait for the stopped attempt's pods: the fast timer must keep looking
    assert not settled({"phase": "Stopped"}, {ANNOTATION_RESUME: "true"})
