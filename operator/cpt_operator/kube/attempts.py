"""Which attempt each of a run's objects belongs to, from what one pass lists (pure).

Every object the operator creates for an attempt, and every pod its Job makes, carries the run
and attempt labels. Grouping them by attempt tells the reconcile core what it needs to keep at
most one attempt's pods running: the current attempt's Job and pods, the attempts whose pods
have not terminated yet, and the objects of any other attempt (strays, to be swept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .builders import LABEL_ATTEMPT, LABEL_EVALUATION, Object

Children = Mapping[str, Sequence[Object]]
"""A run's objects by kind (Job, Pod, ConfigMap, Service), as listed by its run label."""


def attempt_of(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(value) if value.isdigit() else None


def alive(pod: Mapping[str, Any]) -> bool:
    """Not terminated: a deleted pod still runs (and holds its GPUs) until its grace ends."""
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


@dataclass(frozen=True)
class Attempts:
    current: int
    job: Object | None = None
    pods: list[Object] = field(default_factory=list)
    """The current attempt's pods."""
    pods_left: tuple[int, ...] = ()
    strays: dict[int, tuple[str, ...]] = field(default_factory=dict)
    stray_objects: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    """(kind, name) of what a sweep deletes by name (Jobs, ConfigMaps, Services); pods go by label."""
    evaluations: dict[str, list[Object]] = field(default_factory=dict)
    """The separate evaluations' Jobs and pods, by kind (they belong to no attempt)."""


def group(children: Children, current: int) -> Attempts:
    """Split a run's objects into the current attempt's and the others'. Objects already being
    deleted are not strays (their deletion is under way), but their pods still count as left
    until they terminate."""
    job, pods, left = None, [], set()
    strays: dict[int, set[str]] = {}
    named: dict[int, list[tuple[str, str]]] = {}
    evaluations: dict[str, list[Object]] = {}
    for kind, objects in children.items():
        for obj in objects:
            number = attempt_of(obj)
            if number is None:
                if LABEL_EVALUATION in (obj.get("metadata", {}).get("labels") or {}):
                    evaluations.setdefault(kind, []).append(dict(obj))
                continue
            if kind == "Pod" and alive(obj):
                left.add(number)
            if number == current:
                if kind == "Job":
                    job = dict(obj)
                elif kind == "Pod":
                    pods.append(dict(obj))
            elif not _deleting(obj) and (kind != "Pod" or alive(obj)):  # a Job's ended pods go with it
                strays.setdefault(number, set()).add(kind)
                if kind != "Pod":
                    named.setdefault(number, []).append((kind, obj["metadata"]["name"]))
    return Attempts(current=current, job=job, pods=pods, pods_left=tuple(sorted(left)),
                    strays={n: tuple(sorted(k)) for n, k in strays.items()}, stray_objects=named,
                    evaluations=evaluations)
