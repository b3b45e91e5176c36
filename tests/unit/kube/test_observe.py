"""Merging Prometheus evaluations with checkpoint manifests, and reading the Job's state."""
from __future__ import annotations

from cpt_api.alerts import AlertRef, encode_refs
from cpt_api.manifest import FileEntry, Lineage, Manifest
from cpt_operator.kube.launcher import IndexedJobLauncher
from cpt_operator.kube.observe import PointCache, requests
from cpt_operator.kube.settings import Settings
from cpt_operator.policy.types import EvalPoint
from cpt_operator.records import merge_points
from cpt_api.store import CheckpointRef


def ref(attempt: int, step: int, evals: dict[str, float], stable: bool = True) -> CheckpointRef:
    name = f"attempt-{attempt:03d}/step-{step:08d}"
    lineage = Lineage(run="r", attempt=attempt, parent=None, base_uri="s3://m", restore_mode="weightsOnly",
                      data_version="d", tokenizer_hash="t", config_hash="c")
    manifest = Manifest(step=step, tokens=step * 100, created_at="2026-01-01T00:00:00Z", lineage=lineage,
                        files={"model.safetensors": FileEntry(size=1, sha256="0" * 64)}, evals=evals, stable=stable)
    return CheckpointRef(name, f"s3://c/{name}", manifest)


def test_the_manifest_wins_over_prometheus_at_the_same_step_and_names_the_checkpoint():
    series = [EvalPoint(attempt=1, step=50, metrics={"general.perplexity": 10.5}),
              EvalPoint(attempt=1, step=75, metrics={"general.perplexity": 11.0})]
    merged = merge_points(series, [], [ref(1, 50, {"general.perplexity": 10.0}, stable=False)])
    assert [(p.step, p.checkpoint, p.stable, dict(p.metrics)) for p in merged] == [
        (50, "attempt-001/step-00000050", False, {"general.perplexity": 10.0}),
        (75, None, True, {"general.perplexity": 11.0}),
    ]


def test_a_checkpoint_without_evaluations_adds_no_point():
    assert merge_points([], [], [ref(1, 50, {})]) == []


def test_the_cache_reads_the_whole_life_once_then_only_recent_windows():
    cache = PointCache()
    assert cache.window(created_at=1000.0, now=4600.0) == 3660
    cache.update([EvalPoint(attempt=1, step=10, metrics={"a.nll": 1.0})], now=4600.0)
    assert cache.window(created_at=1000.0, now=4605.0) == 65
    cache.update([EvalPoint(attempt=1, step=20, metrics={"a.nll": 0.95})], now=4605.0)
    points = cache.update([EvalPoint(attempt=1, step=10, metrics={"a.nll": 1.5}),  # cut off by the window
                           EvalPoint(attempt=1, step=20, metrics={"a.nll": 0.9, "b.nll": 2.0}),
                           EvalPoint(attempt=1, step=30, metrics={"a.nll": 0.8})], now=4610.0)
    assert [(p.step, dict(p.metrics)) for p in points] == [
        (10, {"a.nll": 1.0}), (20, {"a.nll": 0.9, "b.nll": 2.0}), (30, {"a.nll": 0.8})]


def test_annotations_become_requests_and_only_one_shot_ones_are_cleared():
    alert = AlertRef(gate="a", attempt=2, key="f00d@2026-11-30T12:00:00Z")
    asks = requests({"cpt.mlops.dev/stop": "true", "cpt.mlops.dev/rollback-to": "attempt-001/step-00000050",
                     "cpt.mlops.dev/gate-alert": encode_refs([alert]), "other": "x"})
    assert asks.stop and asks.rollback_to == "attempt-001/step-00000050" and asks.alerts == (alert,)
    assert asks.one_shot == ["cpt.mlops.dev/rollback-to", "cpt.mlops.dev/gate-alert"]
    # an unreadable value (an older operator's "gate,gate") acts on nothing and is cleared all the same
    legacy = requests({"cpt.mlops.dev/gate-alert": "b,a"})
    assert legacy.alerts == () and legacy.one_shot == ["cpt.mlops.dev/gate-alert"]
    assert requests(None) == requests({"cpt.mlops.dev/stop": "false"})
    assert requests(None).one_shot == []


LAUNCHER = IndexedJobLauncher(Settings())


def job(*conditions: tuple[str, str], deleting: bool = False) -> dict:
    meta = {"name": "r-a1", **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    return {"metadata": meta, "status": {"conditions": [{"type": t, "status": s} for t, s in conditions]}}


def pod(phase: str, exit_code: int | None = None) -> dict:
    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
    return {"metadata": {"name": "r-a1-0-xyz"}, "status": status}


def test_job_states_map_to_attempt_states():
    assert LAUNCHER.attempt_state(1, job(), [pod("Pending")]).state == "running"
    assert LAUNCHER.attempt_state(1, job(("Complete", "True")), []).state == "succeeded"
    failed = LAUNCHER.attempt_state(1, job(("FailureTarget", "True")), [pod("Failed", 1)])
    assert failed.state == "failed" and "exited with code 1" in failed.message
    assert LAUNCHER.attempt_state(0, None, []).state == "absent"


def test_a_deleted_job_whose_pods_still_run_is_still_running_then_gone():
    assert LAUNCHER.attempt_state(1, job(deleting=True), [pod("Running")]).state == "running"
    assert LAUNCHER.attempt_state(1, None, [pod("Running")]).state == "running"
    gone = LAUNCHER.attempt_state(1, None, [pod("Failed", 137)])
    assert gone.state == "absent" and "gone" in gone.message
