"""A run's listed objects, grouped by attempt: the current attempt's Job and pods, the attempts
whose pods are still present, and the strays to sweep."""
from __future__ import annotations

from typing import Any

from cpt_operator.kube.attempts import group
from cpt_operator.kube.builders import LABEL_ATTEMPT


def obj(name: str, attempt: int, phase: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {LABEL_ATTEMPT: str(attempt)}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, **({"status": {"phase": phase}} if phase else {})}


def test_the_current_attempt_is_split_from_the_others() -> None:
    found = group({"Job": [obj("r-a1", 1), obj("r-a2", 2), obj("r-a3", 3)],
                   "Pod": [obj("r-a1-0", 1, "Failed"), obj("r-a2-0", 2, "Running"), obj("r-a2-1", 2, "Failed"),
                           obj("r-a3-0", 3, "Pending")],
                   "ConfigMap": [obj("r-a1", 1), obj("r-a2", 2)], "Service": [obj("r-a2", 2)]}, current=2)
    assert found.job is not None and found.job["metadata"]["name"] == "r-a2"
    assert [p["metadata"]["name"] for p in found.pods] == ["r-a2-0", "r-a2-1"]
    assert found.pods_left == (2, 3)  # attempt 1's only pod has terminated
    # attempt 1's ended pod goes with its Job; attempt 3's pending pod is a stray of its own
    assert found.strays == {1: ("ConfigMap", "Job"), 3: ("Job", "Pod")}
    assert found.stray_objects == {1: [("Job", "r-a1"), ("ConfigMap", "r-a1")], 3: [("Job", "r-a3")]}


def test_what_is_being_deleted_is_no_stray_but_its_pods_still_count_until_they_terminate() -> None:
    found = group({"Job": [obj("r-a1", 1, deleting=True)], "Pod": [obj("r-a1-0", 1, "Running", deleting=True)]},
                  current=2)
    assert found.strays == {} and found.pods_left == (1,)
    assert found.job is None and found.pods == []


def test_objects_without_an_attempt_label_are_ignored() -> None:
    stranger = {"metadata": {"name": "x", "labels": {}}}
    assert group({"Job": [stranger], "Pod": [stranger]}, current=1) == group({}, current=1)
