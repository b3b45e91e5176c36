"""An attempt whose pods do not start: the Started condition names the cause at once, and at the
start deadline the attempt's pods go and the run fails (StartTimeout) without spending restarts."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from cpt_operator.api import CptRunStatus, Phase
from cpt_operator.api.status import Condition, ConditionType, Reason
from cpt_operator.policy.admission import Admission
from cpt_operator.policy.start import Cause, Start, instant
from cpt_operator.reconcile import (AttemptState, Emit, Pin, StartAttempt, StopAttempt, reconcile,
                                    reconcile_unreadable)

from .test_queueing import queued_spec
from .test_reconcile import BASE, NOW, observed, of, point, running, spec

POD = "legal-a1-0-x7k2p"
PULL = Cause(Reason.image_pull_failed, POD, "ErrImagePull", 'failed to pull and unpack image "x:v1": not found')
BACKOFF = Cause(Reason.image_pull_failed, POD, "ImagePullBackOff", 'Back-off pulling image "x:v1"')
SECRET = Cause(Reason.container_config_error, POD, "CreateContainerConfigError", 'secret "s3-creds" not found')


def starting(cause: Cause | None, age_s: float = 10) -> Start:
    """An attempt whose Job started `age_s` before NOW."""
    return Start("starting", instant(NOW) - timedelta(seconds=age_s), cause)


def timed_spec(timeout: int = 300, **over: Any) -> Any:
    doc = spec(**over).model_dump(by_alias=True, exclude_none=True)
    doc["resources"]["startTimeoutSeconds"] = timeout
    return type(spec()).model_validate(doc)


def started_cond(status: CptRunStatus) -> tuple[str, str, str]:
    [cond] = [c for c in status.conditions if c.type == ConditionType.started.value]
    return cond.status, cond.reason, cond.message


RUNNING = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)


def test_the_cause_shows_at_once_with_one_event_per_fault() -> None:
    plan = reconcile(timed_spec(), RUNNING, observed(running(start=starting(PULL))))
    assert started_cond(plan.status) == (
        "False", Reason.image_pull_failed.value,
        f"attempt 1: {PULL.describe()} (start deadline 2026-11-23T10:04:50Z)")
    assert [(e.type, e.reason, e.message) for e in of(plan, Emit)] == [
        ("Warning", Reason.image_pull_failed.value, f"attempt 1: {PULL.describe()}")]
    assert plan.status.phase == Phase.running and not of(plan, StopAttempt)
    # the kubelet backs off: the message follows it, the fault is the same, no second event
    again = reconcile(timed_spec(), plan.status, observed(running(start=starting(BACKOFF))))
    assert started_cond(again.status)[1:] == (Reason.image_pull_failed.value,
                                              f"attempt 1: {BACKOFF.describe()} (start deadline 2026-11-23T10:04:50Z)")
    assert not of(again, Emit)


def test_a_pod_on_its_way_is_no_fault_and_posts_nothing_until_a_fault_appears() -> None:
    creating = Cause(Reason.starting, POD, "ContainerCreating")
    plan = reconcile(timed_spec(), RUNNING, observed(running(start=starting(creating))))
    assert started_cond(plan.status)[:2] == ("False", Reason.starting.value)
    assert f"pod {POD}: ContainerCreating" in started_cond(plan.status)[2] and not of(plan, Emit)
    then = reconcile(timed_spec(), plan.status, observed(running(start=starting(SECRET))))
    assert started_cond(then.status)[1] == Reason.container_config_error.value
    assert [(e.type, e.reason) for e in of(then, Emit)] == [("Warning", Reason.container_config_error.value)]


def test_past_the_deadline_the_pods_go_and_the_run_fails_without_a_restart() -> None:
    plan = reconcile(timed_spec(), RUNNING, observed(running(start=starting(SECRET, 300))))
    assert plan.status.phase == Phase.failed and plan.status.restarts == 0
    assert of(plan, StopAttempt) == [StopAttempt(1, plan.status.message, checkpoint=False)]
    assert plan.status.message == f"attempt 1 did not start within 300 s: {SECRET.describe()}"
    [failed] = [c for c in plan.status.conditions if c.type == ConditionType.failed.value]
    assert (failed.status, failed.reason) == ("True", Reason.start_timeout.value)
    assert started_cond(plan.status)[1] == Reason.container_config_error.value
    assert ("Warning", Reason.start_timeout.value) in [(e.type, e.reason) for e in of(plan, Emit)]
    assert not of(plan, StartAttempt)
    # the pods still stopping: the Job is deleted again, nothing else happens
    later = reconcile(timed_spec(), plan.status, observed(running(start=starting(SECRET, 310))))
    assert later.status.phase == Phase.failed and of(later, StopAttempt) and not of(later, StartAttempt)


def test_just_before_the_deadline_the_attempt_still_may_start() -> None:
    plan = reconcile(timed_spec(), RUNNING, observed(running(start=starting(SECRET, 299))))
    assert plan.status.phase == Phase.running and not of(plan, StopAttempt)


def test_once_every_trainer_runs_the_start_is_not_looked_at_again() -> None:
    plan = reconcile(timed_spec(), RUNNING, observed(running(start=Start("started", instant(NOW)))))
    assert started_cond(plan.status) == ("True", Reason.trainers_running.value, "attempt 1: every trainer is running")
    # a later pass seeing a pod go unready (a node lost...) is a failure, not a late start
    later = reconcile(timed_spec(), plan.status, observed(running(start=starting(PULL, 3600))))
    assert later.status.phase == Phase.running and started_cond(later.status)[0] == "True"


def test_a_queued_attempt_is_not_starting_and_has_no_deadline() -> None:
    waiting = Admission("queued", "Pending", "insufficient unused quota for nvidia.com/gpu")
    plan = reconcile(queued_spec(), RUNNING, observed(running(start=Start("queued"), admission=waiting)))
    assert started_cond(plan.status) == ("False", Reason.starting.value,
                                         "attempt 1: its Job has not started yet (it waits for Kueue to admit it)")
    assert plan.status.phase == Phase.running and not of(plan, StopAttempt)


def test_a_job_that_failed_before_its_trainer_ran_fails_the_run_without_a_restart() -> None:
    never_ran = Cause(Reason.container_run_failed, POD, "StartError",
                      'exec: "python": executable file not found in $PATH')
    failed = AttemptState(number=1, state="failed", message=f"pod {POD} exited with code 128 (StartError)",
                          start=starting(never_ran))
    plan = reconcile(spec(), RUNNING, observed(failed, (point(10, 10.1),)))
    assert plan.status.phase == Phase.failed and plan.status.restarts == 0 and not of(plan, StartAttempt)
    [cond] = [c for c in plan.status.conditions if c.type == ConditionType.failed.value]
    assert cond.reason == Reason.start_failed.value
    assert plan.status.message == f"attempt 1 failed before its trainers ran: {never_ran.describe()}"


def test_a_job_that_failed_after_its_trainer_ran_restarts_as_before() -> None:
    failed = AttemptState(number=1, state="failed", message="pod exited with code 1",
                          start=Start("started", instant(NOW)))
    plan = reconcile(spec(), RUNNING, observed(failed, (point(10, 10.1),)))
    [start] = of(plan, StartAttempt)
    assert start.number == 2 and plan.status.restarts == 1


def test_each_new_attempt_starts_again_from_not_started() -> None:
    status = RUNNING.model_copy(update={"conditions": [Condition(
        type=ConditionType.started.value, status="True", reason=Reason.trainers_running.value,
        message="attempt 1: every trainer is running")]})
    failed = AttemptState(number=1, state="failed", message="pod exited with code 1")
    plan = reconcile(spec(), status, observed(failed, (point(10, 10.1),)))
    assert of(plan, StartAttempt)
    assert started_cond(plan.status) == ("False", Reason.starting.value, "attempt 2: its Job has not started yet")


def test_a_backend_that_knows_no_pods_gets_no_started_condition() -> None:
    plan = reconcile(spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent")))
    plan = reconcile(spec(), plan.status, observed(running()))
    assert not [c for c in plan.status.conditions if c.type == ConditionType.started.value]


UNREADABLE = "Secret ml/s3-creds (resources.s3SecretRef): it does not exist"


def test_without_its_secret_a_run_still_fails_at_the_start_deadline() -> None:
    first = reconcile_unreadable(timed_spec(), RUNNING, observed(running(start=starting(SECRET))), UNREADABLE)
    valid = [c for c in first.status.conditions if c.type == ConditionType.spec_valid.value]
    assert [(c.status, c.reason, c.message) for c in valid] == [("False", Reason.s3_secret_unreadable.value,
                                                                 UNREADABLE)]
    assert [e.reason for e in of(first, Emit)] == [Reason.s3_secret_unreadable.value,
                                                   Reason.container_config_error.value]
    assert started_cond(first.status)[1] == Reason.container_config_error.value
    assert first.status.phase == Phase.running and not of(first, Pin)  # no storage is touched
    late = reconcile_unreadable(timed_spec(), first.status, observed(running(start=starting(SECRET, 300))),
                                UNREADABLE)
    assert late.status.phase == Phase.failed and of(late, StopAttempt) and not of(late, Pin)
    assert [c.reason for c in late.status.conditions if c.type == ConditionType.failed.value] == [
        Reason.start_timeout.value]
    assert [e.reason for e in of(late, Emit)] == [Reason.start_timeout.value]  # the Secret's was posted once


def test_without_its_secret_a_run_can_still_be_stopped() -> None:
    obs = observed(running(start=Start("started", instant(NOW))), stop_requested=True)
    plan = reconcile_unreadable(timed_spec(), RUNNING, obs, UNREADABLE)
    assert plan.status.phase == Phase.stopped and of(plan, StopAttempt)
