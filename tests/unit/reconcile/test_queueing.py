"""Runs that queue in Kueue: the Admitted condition follows the Workload, and an eviction
(preemption, pods not ready in time) resumes from the last checkpoint without counting a restart."""
from __future__ import annotations

from typing import Any

from cpt_api import CptRunStatus, Phase
from cpt_api.status import ConditionType, Reason
from cpt_operator.policy.admission import Admission
from cpt_operator.reconcile import AttemptState, Emit, StartAttempt, StopAttempt, reconcile

from .test_reconcile import BASE, observed, of, point, running, spec

PREEMPTED = Admission("evicted", "Preempted", "Preempted to accommodate a higher priority workload")


def queued_spec(**over: Any) -> Any:
    doc = spec(**over).model_dump(by_alias=True, exclude_none=True)
    doc["resources"]["queue"] = "gpu"
    return type(spec()).model_validate(doc)


def admitted_cond(status: CptRunStatus) -> tuple[str, str, str]:
    [cond] = [c for c in status.conditions if c.type == ConditionType.admitted.value]
    return cond.status, cond.reason, cond.message


def test_a_queued_run_starts_its_attempt_waiting_for_admission() -> None:
    plan = reconcile(queued_spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent")))
    assert of(plan, StartAttempt)
    assert admitted_cond(plan.status) == ("False", Reason.queued.value,
                                          "attempt 1 waits for admission by LocalQueue gpu")


def test_the_admitted_condition_follows_kueue() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    waiting = Admission("queued", "Pending", "insufficient unused quota for nvidia.com/gpu")
    plan = reconcile(queued_spec(), status, observed(running(admission=waiting)))
    assert admitted_cond(plan.status) == ("False", "Pending", f"attempt 1 waits for admission: {waiting.message}")
    plan = reconcile(queued_spec(), plan.status,
                     observed(running(admission=Admission("admitted", "Admitted", "admitted by ClusterQueue gpu"))))
    assert admitted_cond(plan.status)[:2] == ("True", "Admitted")


def test_a_run_without_a_queue_has_no_admitted_condition() -> None:
    plan = reconcile(spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent")))
    assert not [c for c in plan.status.conditions if c.type == ConditionType.admitted.value]


def test_a_preempted_attempt_stops_then_resumes_from_its_last_checkpoint_without_a_restart() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.2), point(20, 10.1))
    # Kueue evicted the Workload: the Job goes (its pods write a last checkpoint meanwhile)
    plan = reconcile(queued_spec(), status, observed(running(step=20, admission=PREEMPTED), points))
    assert of(plan, StopAttempt) == [StopAttempt(1, "evicted by Kueue")] and not of(plan, StartAttempt)
    assert plan.status.evictions == 1 and plan.status.restarts == 0
    assert admitted_cond(plan.status)[:2] == ("False", Reason.evicted.value)
    assert "Preempted" in plan.status.message
    assert [e.reason for e in of(plan, Emit)] == [Reason.evicted.value]
    # the pods are still stopping: nothing starts, nothing is counted twice
    stopping = reconcile(queued_spec(), plan.status, observed(running(step=20), points, pods_left=(1,)))
    assert not of(stopping, StartAttempt) and stopping.status.evictions == 1 and not of(stopping, Emit)
    # the Job and its pods are gone: that is no failure, the next attempt queues from the last save
    gone = AttemptState(number=1, state="absent", message="the Job of attempt 1 is gone")
    resumed = reconcile(queued_spec(), stopping.status, observed(gone, points))
    [start] = of(resumed, StartAttempt)
    assert start.number == 2 and start.restore_from == "attempt-001/step-00000020"
    assert resumed.status.restarts == 0 and resumed.status.evictions == 1
    assert admitted_cond(resumed.status)[:2] == ("False", Reason.queued.value)


def test_an_evicted_attempt_whose_job_failed_meanwhile_is_not_counted_either() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    failed = AttemptState(number=1, state="failed", message="pod exited with code 143", admission=PREEMPTED)
    plan = reconcile(queued_spec(), status, observed(failed, (point(10, 10.2),)))
    [start] = of(plan, StartAttempt)
    assert start.restore_from == "attempt-001/step-00000010" and plan.status.restarts == 0


def test_an_attempt_that_finished_before_its_eviction_was_seen_finishes_the_run() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    done = AttemptState(number=1, state="succeeded", admission=PREEMPTED)
    plan = reconcile(queued_spec(), status, observed(done, (point(100, 10.0),)))
    assert plan.status.phase == Phase.succeeded and plan.status.evictions == 0


def test_eviction_handling_is_idempotent() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    obs = observed(running(step=20, admission=PREEMPTED), (point(10, 10.2),))
    first = reconcile(queued_spec(), status, obs)
    second = reconcile(queued_spec(), first.status, obs)
    assert first.status == second.status and of(second, StopAttempt) == of(first, StopAttempt)
