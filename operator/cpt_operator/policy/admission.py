"""Gang admission by Kueue: what a queued attempt's Job and its Workload say (pure).

With `resources.queue` the attempt's Job is created suspended; Kueue makes a Workload for it and,
once the ClusterQueue has quota for every pod at once, admits it and unsuspends the Job. Later
it may evict it again: a higher-priority Workload preempts it, or its pods were not all ready
within `waitForPodsReady.timeout`. Kueue then suspends the Job (its pods get SIGTERM and their
grace to checkpoint) and requeues the Workload.

An eviction is not the attempt's fault, so the reconcile core does not count it as a failure:
it lets the attempt's pods finish their last checkpoint, deletes the Job (and with it the
Workload, so Kueue cannot start the old attempt again from its stale restore point) and queues a
new attempt that resumes from that checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

AdmissionState = Literal["queued", "admitted", "evicted"]


@dataclass(frozen=True)
class Admission:
    state: AdmissionState
    reason: str
    """Kueue's reason (Pending, Admitted, Preempted, PodsReadyTimeout...), or Queued before the
    Workload exists."""
    message: str = ""


def _conditions(workload: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in workload.get("status", {}).get("conditions", []) or []}


def _true(cond: Mapping[str, Any] | None) -> bool:
    return bool(cond) and cond.get("status") == "True"  # type: ignore[union-attr]


def admission(workload: Mapping[str, Any] | None) -> Admission:
    """The admission state of a queued attempt from its Workload (None: Kueue has not made it
    yet). An eviction wins over the Admitted condition that lingers while the pods stop."""
    if workload is None:
        return Admission("queued", "Queued", "waiting for Kueue to create the attempt's Workload")
    cond = _conditions(workload)
    evicted = cond.get("Evicted")
    if _true(evicted):
        assert evicted is not None
        return Admission("evicted", str(evicted.get("reason") or "Evicted"), str(evicted.get("message") or ""))
    if _true(cond.get("Admitted")):
        admitted = (workload.get("status", {}).get("admission") or {}).get("clusterQueue")
        return Admission("admitted", "Admitted", f"admitted by ClusterQueue {admitted}" if admitted else "admitted")
    reserved = cond.get("QuotaReserved")
    if reserved is not None and reserved.get("status") == "False":
        return Admission("queued", str(reserved.get("reason") or "Pending"), str(reserved.get("message") or ""))
    if _true(reserved):  # quota held, admission checks pending
        return Admission("queued", "QuotaReserved", str(reserved.get("message") or "quota reserved"))  # type: ignore[union-attr]
    return Admission("queued", "Pending", "waiting in the queue")


def condition(admitted: Admission, attempt: int) -> tuple[bool, str, str]:
    """(status, reason, message) of the run's Admitted condition. Kueue's reason is kept as the
    condition's reason when it is a valid one (CamelCase), so `kubectl get cptruns` shows it."""
    reason = admitted.reason if admitted.reason.isalnum() and admitted.reason[:1].isalpha() else "Pending"
    what = {"queued": "waits for admission", "admitted": "is admitted",
            "evicted": "was evicted"}[admitted.state]
    detail = f": {admitted.message}" if admitted.message else ""
    return admitted.state == "admitted", reason, f"attempt {attempt} {what}{detail}"
