"""What a queued attempt's Kueue Workload says: queued, admitted or evicted."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_operator.policy.admission import Admission, admission, condition


def workload(*conditions: tuple[str, str, str, str], cluster_queue: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                             for t, s, r, m in conditions]}
    if cluster_queue:
        status["admission"] = {"clusterQueue": cluster_queue}
    return {"metadata": {"name": "job-x"}, "status": status}


PENDING = ("QuotaReserved", "False", "Pending",
           "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu")
RESERVED = ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu")
ADMITTED = ("Admitted", "True", "Admitted", "The workload is admitted")
PREEMPTED = ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: 1) due to prioritization")
NOT_READY = ("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout default/job-x")
READMITTED = ("Evicted", "False", "QuotaReserved", "Previously: Preempted")


@pytest.mark.parametrize("found, expected", [
    pytest.param(None, Admission("queued", "Queued", "waiting for Kueue to create the attempt's Workload"),
                 id="a Job whose Workload Kueue has not made yet is queued"),
    pytest.param(workload(), Admission("queued", "Pending", "waiting in the queue"),
                 id="a Workload without conditions waits in the queue"),
    pytest.param(workload(PENDING), Admission("queued", "Pending", PENDING[3]),
                 id="a Workload without quota is queued with Kueue's reason and message"),
    pytest.param(workload(RESERVED), Admission("queued", "QuotaReserved", RESERVED[3]),
                 id="quota reserved but not yet admitted is still queued"),
    pytest.param(workload(RESERVED, ADMITTED, cluster_queue="gpu"),
                 Admission("admitted", "Admitted", "admitted by ClusterQueue gpu"),
                 id="an admitted Workload names its ClusterQueue"),
    pytest.param(workload(RESERVED, ADMITTED, PREEMPTED), Admission("evicted", "Preempted", PREEMPTED[3]),
                 id="a preemption wins over the Admitted condition that lingers while the pods stop"),
    pytest.param(workload(PENDING, NOT_READY), Admission("evicted", "PodsReadyTimeout", NOT_READY[3]),
                 id="pods not ready in time is an eviction"),
    pytest.param(workload(RESERVED, ADMITTED, READMITTED, cluster_queue="gpu"),
                 Admission("admitted", "Admitted", "admitted by ClusterQueue gpu"),
                 id="an eviction reset by a new admission is over"),
])
def test_admission(found: dict[str, Any] | None, expected: Admission) -> None:
    assert admission(found) == expected


def test_the_condition_keeps_kueues_reason_and_names_the_attempt() -> None:
    assert condition(admission(workload(PENDING)), 3) == (False, "Pending", f"attempt 3 waits for admission: {PENDING[3]}")
    assert condition(admission(workload(RESERVED, ADMITTED, cluster_queue="gpu")), 1) == (
        True, "Admitted", "attempt 1 is admitted: admitted by ClusterQueue gpu")


def test_a_reason_that_is_no_valid_condition_reason_reads_pending() -> None:
    assert condition(Admission("queued", "not a reason!"), 1)[1] == "Pending"
