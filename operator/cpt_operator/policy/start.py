"""Whether an attempt's pods have started and, while they have not, why (pure).

An attempt is *starting* from the moment its Job may make pods until every pod's trainer has
run. The clock is the Job's `status.startTime`: the Job controller sets it when it first syncs a
Job that is not suspended, and sets it again when Kueue unsuspends (admits) a queued one; a
suspended Job has none (and its Suspended condition is True), so a queued attempt is not starting
yet and no deadline runs for it.

Meanwhile the kubelet and the scheduler write what holds a pod back into the pod's status:

* `containerStatuses[].state.waiting` (and `initContainerStatuses`): ErrImagePull,
  ImagePullBackOff, ErrImageNeverPull, InvalidImageName... (the image); CreateContainerConfigError
  (a Secret, ConfigMap or key the container names is missing; the message names it);
  CreateContainerError; RunContainerError. ContainerCreating and PodInitializing are normal.
* a container `terminated` with reason StartError (containerd) or ContainerCannotRun: it was
  created but never ran, e.g. its command is not in the image; with restartPolicy Never the pod,
  and with it the Job, fails.
* the condition `PodScheduled=False`, reason Unschedulable, whose message says why no node fits
  (too few free `nvidia.com/gpu`, no node matching the selector, an untolerated taint).

`assess` reads all pods of an attempt into one `Start` carrying the cause to show: of all the
pods' faults the most telling (in `api.status.START_CAUSES` order, then by pod name), else what
the first pod not yet running waits for. `overdue` says whether the start deadline has passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Mapping, Sequence

from cpt_api.status import START_CAUSES, Reason

MESSAGE_LIMIT = 300
"""Characters kept of a kubelet's or scheduler's message: an image pull error quotes URLs and the
registry's answer at length, and the cause goes into condition messages and events."""

_WAITING = {
    **dict.fromkeys(("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
                     "ImageInspectError", "RegistryUnavailable", "SignatureValidationFailed"),
                    Reason.image_pull_failed),
    "CreateContainerConfigError": Reason.container_config_error,
    "CreateContainerError": Reason.container_create_failed,
    "PreStartHookError": Reason.container_create_failed,
    "RunContainerError": Reason.container_run_failed,
    "PostStartHookError": Reason.container_run_failed,
}
"""Waiting reasons that are faults, as Kubernetes 1.36's kubelet names them (pkg/kubelet:
images/types.go, kuberuntime/kuberuntime_container.go, container/sync_result.go; cri-api errors)."""
_NEVER_RAN = frozenset({"StartError", "ContainerCannotRun"})
"""Reasons of a container that terminated without having run (containerd; dockershim's name)."""

StartState = Literal["queued", "starting", "started"]


@dataclass(frozen=True)
class Cause:
    reason: Reason
    """A fault in `START_CAUSES`, or `Reason.starting` for a pod that is merely on its way."""
    pod: str
    """The pod it was seen on ("" when it is about pods that do not exist yet)."""
    detail: str
    """What the kubelet or the scheduler called it: ErrImagePull, Unschedulable, ContainerCreating."""
    message: str = ""
    """Their message, trimmed to `MESSAGE_LIMIT`."""

    @property
    def fault(self) -> bool:
        return self.reason in START_CAUSES

    def describe(self) -> str:
        text = f"pod {self.pod}: {self.detail}" if self.pod else self.detail
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True)
class Start:
    state: StartState
    """queued: no clock yet (a suspended Job, or none yet); started: every trainer runs or ran."""
    since: datetime | None = None
    """When the clock began (the Job's startTime)."""
    cause: Cause | None = None
    """While starting: what holds the attempt back."""


def instant(value: str) -> datetime:
    """An RFC 3339 time as the API server writes it (`2026-12-01T10:00:00Z`)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def clock_start(job: Mapping[str, Any] | None) -> datetime | None:
    """When the Job began making pods: its startTime, unless it is suspended (queued)."""
    status = (job or {}).get("status") or {}
    suspended = any(c.get("type") == "Suspended" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
    started = status.get("startTime")
    return instant(started) if started and not suspended else None


def _trim(message: str | None) -> str:
    text = " ".join((message or "").split())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 1] + "…"


def _ran(state: Mapping[str, Any]) -> bool:
    ended = state.get("terminated")
    return "running" in state or (ended is not None and ended.get("reason") not in _NEVER_RAN)


def _container_fault(name: str, status: Mapping[str, Any]) -> Cause | None:
    state = status.get("state") or {}
    waiting, ended = state.get("waiting") or {}, state.get("terminated") or {}
    if waiting.get("reason") in _WAITING:
        return Cause(_WAITING[waiting["reason"]], name, waiting["reason"], _trim(waiting.get("message")))
    if ended.get("reason") in _NEVER_RAN:
        return Cause(Reason.container_run_failed, name, ended["reason"], _trim(ended.get("message")))
    return None


def _scheduling_fault(name: str, pod: Mapping[str, Any]) -> Cause | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            return Cause(Reason.unschedulable, name, "Unschedulable", _trim(cond.get("message")))
    return None


def pod_cause(pod: Mapping[str, Any]) -> Cause | None:
    """Why this pod's containers do not all run yet (None: they all run or have run)."""
    name = str(pod.get("metadata", {}).get("name", ""))
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    if containers and all(_ran(c.get("state") or {}) for c in containers):
        return None
    for c in [*(status.get("initContainerStatuses") or []), *containers]:
        fault = _container_fault(name, c)
        if fault is not None:
            return fault
    fault = _scheduling_fault(name, pod)
    if fault is not None:
        return fault
    waiting = next(((c.get("state") or {}).get("waiting") or {} for c in containers
                    if "waiting" in (c.get("state") or {})), {})
    return Cause(Reason.starting, name, str(waiting.get("reason") or status.get("phase") or "Pending"))


def _rank(cause: Cause) -> tuple[int, str]:
    order = START_CAUSES.index(cause.reason) if cause.fault else len(START_CAUSES)
    return order, cause.pod


def assess(pods: Sequence[Mapping[str, Any]], *, expected: int, since: datetime | None) -> Start:
    """The attempt's start from its `expected` pods and its clock (`clock_start`)."""
    if since is None:
        return Start("queued")
    causes = [c for c in (pod_cause(p) for p in pods) if c is not None]
    if not causes and len(pods) >= expected:
        return Start("started", since)
    if causes:
        return Start("starting", since, min(causes, key=_rank))
    return Start("starting", since, Cause(Reason.starting, "", f"{len(pods)} of {expected} pods exist"))


def deadline(start: Start, timeout_s: int) -> datetime | None:
    return start.since + timedelta(seconds=timeout_s) if start.since is not None else None


def overdue(start: Start, now: datetime, timeout_s: int) -> bool:
    """Still starting when the deadline passed."""
    by = deadline(start, timeout_s)
    return start.state == "starting" and by is not None and now >= by
