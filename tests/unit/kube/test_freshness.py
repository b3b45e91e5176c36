"""Timer passes read cheaply: Jobs and pods from the operator's watches, one Prometheus read per
namespace and short interval, a run's storage only when it can have changed; and any pass that
would act decides again from a fresh read of everything.

`gs://` is the in-memory stand-in object store (`memory_object_store`); Prometheus is a fake
that returns what a test sets (the real one: tests/e2e, bench/bench_operator.py)."""
from __future__ import annotations

import hashlib
import json
import logging
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import fsspec
import pytest

from cpt_api.manifest import FileEntry, Lineage, Manifest
from cpt_api.status import CptRunStatus, Phase
from cpt_operator.kube.builders import Object, RunRef
from cpt_operator.kube.client import children_of
from cpt_operator.kube.freshness import Shared, Signals, StorageView, acts, stale_at, storage_due
from cpt_operator.kube.handlers import _job_moved, _watched, on_timer
from cpt_operator.kube.passes import reconcile_run
from cpt_operator.kube.prometheus import NamespaceSeries, TrainerSeries, by_run
from cpt_operator.kube.settings import ANNOTATION_STOP
from cpt_operator.policy.types import EvalPoint
from cpt_operator.reconcile import Emit, Pin, Plan, StopAttempt
from cpt_operator.records import Records
from cpt_api.store import CheckpointRef
from tests.unit.kube.cases import RUN
from tests.unit.kube.test_memory_check import LLAMA3_8B_CONFIG, FakeKube, _body, _runtime

pytestmark = pytest.mark.usefixtures("memory_object_store")


# -- one read per namespace and interval -------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_shared_value_is_loaded_once_per_interval_and_key() -> None:
    clock, loads = Clock(), []
    shared: Shared[str] = Shared(2.0, clock)

    def load(key: str) -> str:
        loads.append(key)
        return f"{key}@{clock.now}"

    assert shared.get("ml", lambda: load("ml")) == ("ml@100.0", 100.0)
    clock.now = 101.9
    assert shared.get("ml", lambda: load("ml"))[0] == "ml@100.0"
    assert shared.get("other", lambda: load("other"))[0] == "other@101.9"
    clock.now = 102.0
    assert shared.get("ml", lambda: load("ml"))[0] == "ml@102.0"
    assert loads == ["ml", "other", "ml"]


def test_while_one_caller_loads_anew_the_others_take_the_last_value() -> None:
    import threading

    clock, started, release = Clock(), threading.Event(), threading.Event()
    shared: Shared[str] = Shared(2.0, clock)
    shared.get("ml", lambda: "old")
    clock.now += 5

    def slow() -> str:
        started.set()
        release.wait(5)
        return "new"

    loader = threading.Thread(target=shared.get, args=("ml", slow))
    loader.start()
    started.wait(5)
    assert shared.get("ml", lambda: "not called")[0] == "old"
    release.set()
    loader.join(5)
    assert shared.get("ml", lambda: "not called")[0] == "new"


def test_a_failed_load_is_kept_for_the_interval_too() -> None:
    clock, calls = Clock(), []
    shared: Shared[str] = Shared(2.0, clock)

    def fail() -> str:
        calls.append(1)
        raise OSError("prometheus down")

    for _ in range(3):
        with pytest.raises(OSError, match="prometheus down"):
            shared.get("ml", fail)
    assert len(calls) == 1
    clock.now += 2
    assert shared.get("ml", lambda: "back") == ("back", clock.now)


def _obj(kind: str, run: str, uid: str, attempt: int = 1) -> Object:
    return {"kind": kind, "metadata": {"name": f"{run}-a{attempt}", "labels": {"cpt.mlops.dev/run": run,
                                                                               "cpt.mlops.dev/attempt": str(attempt)},
                                       "ownerReferences": [{"kind": "CptRun", "uid": uid}]}}


def test_the_watched_objects_of_many_runs_give_each_run_only_its_own() -> None:
    listed = {"Job": [_obj("Job", "legal-7b", RUN.uid), _obj("Job", "other", "other-uid"),
                      _obj("Job", "legal-7b", "a-deleted-namesake")],
              "Pod": [_obj("Pod", "legal-7b", "job-uid"), _obj("Pod", "other", "job-uid")]}
    mine = children_of(listed, RUN)  # the watches key them by run label; a namesake's are not ours
    assert [o["metadata"]["ownerReferences"][0]["uid"] for o in mine["Job"]] == [RUN.uid]
    assert [o["metadata"]["labels"]["cpt.mlops.dev/run"] for o in mine["Pod"]] == ["legal-7b"]


def _vector(name: str, run: str, attempt: int, value: float, **labels: str) -> dict[str, Any]:
    return {"metric": {"__name__": name, "run": run, "namespace": "ml", "attempt": str(attempt), **labels},
            "value": [1000.0, str(value)]}


def test_a_namespace_read_gives_each_run_its_own_series_of_its_current_attempt() -> None:
    now = [_vector("cpt_step", "legal-7b", 1, 40), _vector("cpt_step", "legal-7b", 2, 7),
           _vector("cpt_last_checkpoint_step", "legal-7b", 2, 5), _vector("cpt_step", "other", 2, 900),
           _vector("cpt_anomalies_total", "legal-7b", 2, 3, kind="spike")]
    read = NamespaceSeries(80, {}, {}, by_run(now))
    mine = read.of("legal-7b", 2)
    assert (mine.step, mine.checkpoint_step, mine.anomalies) == (7, 5, {"spike": 3})
    assert read.of("absent", 1) == TrainerSeries()


# -- when a run's storage is read again ----------------------------------------------------------
def _ref(attempt: int, step: int, evals: bool = True) -> CheckpointRef:
    manifest = Manifest(step=step, tokens=step, created_at="2026-01-01T00:00:00Z",
                        evals={"general.perplexity": 10.0} if evals else {},
                        lineage=Lineage(run="r", attempt=attempt, parent=None, base_uri="s3://m",
                                        restore_mode="weightsOnly", data_version="d", tokenizer_hash="t",
                                        config_hash="c"), files={})
    return CheckpointRef(f"attempt-{attempt:03d}/step-{step:08d}", "s3://x", manifest)


VIEW = StorageView(identity=("s3://ckpt/r", None), attempt=2, stale_at=120.0, refs=[_ref(1, 50), _ref(2, 100)],
                   records=Records(points=[EvalPoint(attempt=2, step=150, tokens=0, metrics={})]))
STEADY = Signals(identity=("s3://ckpt/r", None), attempt=2, steady=True, checkpoint_step=100, eval_step=150)


@pytest.mark.parametrize("view, signals, now, due", [
    (VIEW, STEADY, 110.0, False),
    (None, STEADY, 110.0, True),
    (VIEW, STEADY, 120.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "steady": False}), 110.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "identity": ("s3://ckpt/r", "other keys")}), 110.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "attempt": 3}), 110.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "checkpoint_step": 200}), 110.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "eval_step": 200}), 110.0, True),
    (VIEW, Signals(**{**STEADY.__dict__, "checkpoint_step": None, "eval_step": None}), 110.0, False),
    (VIEW, Signals(**{**STEADY.__dict__, "anomalies": 1}), 110.0, True),
], ids=["nothing changed within the maximum age: the last read serves",
        "never read",
        "the last read is as old as its maximum age",
        "the attempt is not running undisturbed",
        "it would be read with another identity",
        "another attempt",
        "metrics report a checkpoint storage did not show",
        "metrics report an evaluation storage did not show",
        "no metrics: only the age counts",
        "the anomaly count moved (skip windows may have been written)"])
def test_storage_is_read_again_only_when_it_can_have_changed(view: StorageView | None, signals: Signals,
                                                              now: float, due: bool) -> None:
    assert storage_due(view, signals, now) is due


def test_reads_made_together_fall_due_apart_within_the_maximum_age() -> None:
    ends = [stale_at(100.0, 20.0, draw) for draw in (0.0, 0.25, 0.5, 0.999)]
    assert ends == sorted(set(ends)) and ends[0] == 110.0 and ends[-1] < 120.0


def test_a_plan_acts_when_it_does_more_than_restate_what_is() -> None:
    status = CptRunStatus(phase=Phase.running)
    pins = Pin(("attempt-001/step-00000050",))
    assert not acts(Plan((), status), "Running", None)
    assert not acts(Plan((pins,), status), "Running", pins)
    assert acts(Plan((pins,), status), "Running", None)
    assert not acts(Plan((pins, Emit("Warning", "PolicyWarning", "not judged")), status), "Running", pins)
    assert acts(Plan((StopAttempt(1, "stop"),), status), "Running", pins)
    assert acts(Plan((), status), "Pending", None)


# -- timer passes through reconcile_run ------------------------------------------------------------
class Kube(FakeKube):
    """Counts the listings of a run's objects; `watched` is what the operator's watches hold."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(body)
        self.listed: list[str] = []

    def children(self, run: RunRef, kinds: tuple[str, ...]) -> dict[str, list[Object]]:
        self.listed.append("run")
        return super().children(run, kinds)

    def watched(self) -> dict[str, list[Object]]:
        return {kind: [_watched(o) for o in self.created if o["kind"] == kind] for kind in ("Job", "Pod")}

    def patch_annotations(self, namespace: str, name: str, annotations: dict[str, Any], version: str) -> str:
        return version

    def delete_job(self, namespace: str, name: str) -> bool:
        return True


class Prometheus:
    def __init__(self) -> None:
        self.series = TrainerSeries()
        self.reads: list[str] = []

    def read(self, run: str, namespace: str, attempt: int, window_s: int) -> TrainerSeries:
        self.reads.append("run")
        return self.series

    def read_namespace(self, namespace: str, window_s: int) -> Any:
        self.reads.append("namespace")
        return self

    def of(self, run: str, attempt: int) -> TrainerSeries:
        return self.series


def _checkpoint(root: str, step: int) -> None:
    fs, payload = fsspec.filesystem("gs"), b"weights"
    folder = f"{root}/attempt-001/step-{step:08d}"
    fs.pipe(f"{folder}/model.bin", payload)
    manifest = Manifest(step=step, tokens=step, created_at="2026-01-01T00:00:00Z",
                        evals={"general.perplexity": 10.0},
                        lineage=Lineage(run=RUN.name, attempt=1, parent=None, base_uri="gs://b",
                                        restore_mode="weightsOnly", data_version="d", tokenizer_hash="t",
                                        config_hash="c"),
                        files={"model.bin": FileEntry(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())})
    fs.pipe(f"{folder}/manifest.json", manifest.model_dump_json(by_alias=True).encode())


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Kube, Prometheus, Any, list[str]]:
    import cpt_operator.kube.observing as observing

    storage_reads: list[str] = []
    real = observing.list_checkpoints
    monkeypatch.setattr(observing, "list_checkpoints",
                        lambda root, known=None: storage_reads.append(root) or real(root, known=known))
    kube, prometheus = Kube(_body(tmp_path, LLAMA3_8B_CONFIG, strategy="fsdp")), Prometheus()
    rt = _runtime(kube, [])
    rt.prometheus = prometheus  # type: ignore[assignment]
    reconcile_run(rt, RUN.namespace, RUN.name)  # attempt 1 starts
    assert kube.body["status"]["phase"] == "Running" and len(kube.jobs()) == 1
    reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())  # the first look at attempt 1 reads it all
    kube.listed.clear(), prometheus.reads.clear(), storage_reads.clear()
    rt.series.forget(RUN.namespace)
    return kube, prometheus, rt, storage_reads


def test_steady_timer_passes_share_their_reads_and_leave_storage_alone(running: Any) -> None:
    kube, prometheus, rt, storage_reads = running
    for _ in range(5):
        reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert storage_reads == [] and kube.listed == []
    assert prometheus.reads == ["namespace"]  # within one shared interval
    reconcile_run(rt, RUN.namespace, RUN.name)  # any other trigger reads afresh
    assert len(storage_reads) == 1 and kube.listed[-1] == "run" and prometheus.reads[-1] == "run"


def test_a_checkpoint_the_metrics_report_is_read_at_the_next_timer_pass(running: Any, tmp_path: Path) -> None:
    kube, prometheus, rt, storage_reads = running
    root = kube.body["spec"]["checkpoint"]["uri"]
    _checkpoint(root, 50)
    reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert storage_reads == [] and "lastCheckpoint" not in kube.body["status"]
    prometheus.series = TrainerSeries(step=50, checkpoint_step=50)
    rt.series.forget(RUN.namespace)
    reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert storage_reads and kube.body["status"]["lastCheckpoint"] == "attempt-001/step-00000050"
    read = len(storage_reads)  # twice: the new checkpoint is pinned, and pins are written from fresh reads only
    reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert len(storage_reads) == read  # storage has caught up with the metrics


def test_a_timer_pass_that_would_act_decides_again_from_fresh_reads(running: Any) -> None:
    kube, prometheus, rt, storage_reads = running
    kube.body["metadata"]["annotations"] = {ANNOTATION_STOP: "true"}
    plan = reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert plan is not None and plan.status.phase == Phase.stopped
    assert any(isinstance(a, StopAttempt) for a in plan.actions)
    assert kube.listed[-1] == "run" and prometheus.reads[-1] == "run" and len(storage_reads) == 1


def test_a_finished_runs_storage_view_is_forgotten(running: Any) -> None:
    kube, _, rt, _ = running
    assert set(rt.storage) == {RUN.uid}
    [job] = kube.jobs()
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    plan = reconcile_run(rt, RUN.namespace, RUN.name, watched=kube.watched())
    assert plan is not None and plan.status.phase == Phase.succeeded
    assert rt.storage == {}
    assert json.dumps(kube.body["status"])  # recorded


def test_the_timer_gives_a_pass_the_runs_watched_jobs_and_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    import cpt_operator.kube.handlers as handlers

    passes: list[Any] = []
    monkeypatch.setattr(handlers, "reconcile_run", lambda rt, ns, name, watched: passes.append(watched))
    mine, other = _obj("Job", "legal-7b", RUN.uid), _obj("Job", "other", "x")
    indices = {"run_jobs": {("ml", "legal-7b"): [mine], ("ml", "other"): [other]}, "run_pods": {}}
    on_timer(namespace="ml", name="legal-7b", memo=SimpleNamespace(runtime=None), logger=logging.getLogger(),
             **indices)
    assert passes == [{"Job": [mine], "Pod": []}]


def test_a_watched_object_keeps_what_a_pass_needs_and_drops_the_rest() -> None:
    pod = {"kind": "Pod", "metadata": {**_obj("Pod", "r", "u")["metadata"], "managedFields": [{"big": 1}],
                                       "deletionTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"containers": [{"command": ["torchrun"]}]}, "status": {"phase": "Running"}}
    kept = _watched(pod)
    assert set(kept["metadata"]) == {"name", "labels", "ownerReferences", "deletionTimestamp"}
    assert kept["status"] == {"phase": "Running"} and "spec" not in kept


@pytest.mark.parametrize("event, body, now", [
    ("MODIFIED", {"status": {"active": 1, "ready": 1}}, False),
    ("ADDED", {}, False),
    ("MODIFIED", {"status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}}, True),
    ("MODIFIED", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, True),
    ("MODIFIED", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}, True),
    ("DELETED", {}, True),
], ids=["a running Job's counts moved", "a Job was created", "it is failing", "it completed",
        "it is being deleted", "it is gone"])
def test_a_job_event_triggers_a_pass_only_when_the_job_ended_failed_or_went(event: str, body: dict[str, Any],
                                                                            now: bool) -> None:
    assert _job_moved(body, type=event) is now
