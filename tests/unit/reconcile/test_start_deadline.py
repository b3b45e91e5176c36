"""An attempt whose pods do not start: the Started condition names the cause at once, and at the
start deadline the attempt's pods go and the run fails (StartTimeout) without spending restarts."""
from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from cpt_api import CptRunStatus, Phase
from cpt_api.status import Condition, ConditionType, Reason
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


NOT_READY = Admission("evicted", "PodsReadyTimeout", "Exceeded the PodsReady timeout")
ADMITTED = Admission("admitted", "Admitted", "admitted by ClusterQueue gpu")


def evicted_before_start(status: CptRunStatus, starting_s: float, spec_: Any) -> Any:
    """One attempt of a queued run: admitted, its pods pulling an image that does not exist for
    `starting_s`, then evicted by Kueue's waitForPodsReady; returns the plan of the eviction pass."""
    n = status.attempt
    pulling = reconcile(spec_, status, observed(running(n, start=starting(BACKOFF, starting_s), admission=ADMITTED)))
    assert pulling.status.phase == Phase.running, pulling.status.message
    return reconcile(spec_, pulling.status, observed(running(n, start=Start("queued"), admission=NOT_READY)))


def resumed(status: CptRunStatus, spec_: Any) -> CptRunStatus:
    gone = AttemptState(number=status.attempt, state="absent", message="the Job is gone")
    plan = reconcile(spec_, status, observed(gone))
    assert of(plan, StartAttempt), plan.status.message
    return plan.status


def test_attempts_kueue_evicts_before_they_start_keep_the_start_deadline() -> None:
    spec_ = timed_spec(300, resources={"queue": "gpu"})
    status = RUNNING.model_copy(deep=True)
    for attempt, spent in ((1, 110), (2, 220)):
        plan = evicted_before_start(status, 110, spec_)
        assert plan.status.phase == Phase.running and plan.status.starting_seconds == spent
        status = resumed(plan.status, spec_)
        assert status.attempt == attempt + 1
    # the third attempt has 80 s left of the 300: at 85 s of pulling it is over
    plan = reconcile(spec_, status, observed(running(3, start=starting(BACKOFF, 85), admission=ADMITTED)))
    assert plan.status.phase == Phase.failed, plan.status.message
    assert [c.reason for c in plan.status.conditions if c.type == "Failed"] == [Reason.start_timeout.value]
    assert "did not start within 300 s (220 s of it spent by attempts Kueue evicted" in plan.status.message
    assert "ImagePullBackOff" in plan.status.message and plan.status.restarts == 0


def test_an_eviction_that_uses_up_the_start_time_ends_the_run_naming_the_cause() -> None:
    spec_ = timed_spec(300, resources={"queue": "gpu"})
    status = resumed(evicted_before_start(RUNNING.model_copy(deep=True), 200, spec_).status, spec_)
    # 90 s into the second attempt's pull (100 s left) the operator looks; the next pass, 60 s
    # later, finds it evicted: 350 s in all
    pulling = reconcile(spec_, status, observed(running(2, start=starting(BACKOFF, 90), admission=ADMITTED)))
    later = dataclasses.replace(observed(running(2, start=Start("queued"), admission=NOT_READY)),
                                now=f"{instant(NOW) + timedelta(seconds=60):%Y-%m-%dT%H:%M:%SZ}")
    plan = reconcile(spec_, pulling.status, later)
    assert plan.status.phase == Phase.failed and not of(plan, StartAttempt)
    assert "attempts did not start within 300 s: 350 s spent starting, evicted by Kueue before their " \
           "trainers ran (the last time: PodsReadyTimeout: Exceeded the PodsReady timeout)" in plan.status.message
    assert 'Back-off pulling image "x:v1"' in plan.status.message


def test_an_attempt_whose_trainers_ran_gives_the_next_ones_the_whole_start_time_again() -> None:
    spec_ = timed_spec(300, resources={"queue": "gpu"})
    status = resumed(evicted_before_start(RUNNING.model_copy(deep=True), 200, spec_).status, spec_)
    ran = reconcile(spec_, status, observed(running(2, start=Start("started", instant(NOW)), admission=ADMITTED)))
    assert ran.status.starting_seconds == 0 and ran.status.starting_since is None
    # a preemption of a running attempt is not a failed start
    preempted = reconcile(spec_, ran.status, observed(running(2, start=Start("queued"), admission=Admission(
        "evicted", "Preempted", "Preempted to accommodate a higher priority workload"))))
    assert preempted.status.phase == Phase.running and preempted.status.starting_seconds == 0
