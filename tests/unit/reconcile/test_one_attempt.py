"""At most one attempt's pods run at any time: the next attempt starts only once every other
attempt's pods are gone, and objects of attempts other than status.attempt are swept."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api import CptRunStatus, Phase
from cpt_api.status import Reason
from cpt_operator.policy.types import CheckpointEvals
from cpt_operator.reconcile import AttemptState, Emit, Observed, StartAttempt, Sweep, reconcile

from tests.unit.reconcile.test_reconcile import BASE, NOW, of, spec


def obs(number: int, state: str, **kw: Any) -> Observed:
    return Observed(attempt=AttemptState(number=number, state=state, message="pod x exited with code 1"),  # type: ignore[arg-type]
                    now=NOW, base=BASE, **kw)


def progressing(status: CptRunStatus) -> tuple[str, str]:
    cond = next(c for c in status.conditions if c.type == "Progressing")
    return cond.reason, cond.message


RUNNING = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
ROLLING_BACK = CptRunStatus(phase=Phase.rolling_back, attempt=1, rollbacks=1, base_metrics=BASE)
RUNNING_2 = CptRunStatus(phase=Phase.running, attempt=2, base_metrics=BASE)
STOPPED = CptRunStatus(phase=Phase.stopped, attempt=1, base_metrics=BASE)


@pytest.mark.parametrize("status, attempt, extra", [
    pytest.param(RUNNING, obs(1, "failed"), {"pods_left": (1,)}, id="a failed Job whose other pods still run"),
    pytest.param(ROLLING_BACK, obs(1, "failed"), {"pods_left": (1,)}, id="a rollback from a failed attempt"),
    pytest.param(STOPPED, obs(1, "running"), {}, id="a resume while the stopped attempt still shuts down"),
    pytest.param(CptRunStatus(), obs(0, "absent"), {"strays": {1: ("Job",)}, "pods_left": (1,)},
                 id="a first attempt while an unrecorded attempt 1 exists"),
    pytest.param(RUNNING_2, obs(2, "absent"), {"pods_left": (1,)}, id="a restart while an older attempt's pods run"),
])
def test_no_attempt_starts_while_another_attempts_pods_are_present(status: CptRunStatus, attempt: Observed,
                                                                   extra: dict[str, Any]) -> None:
    observed = Observed(**{**attempt.__dict__, **extra, "resume": status.phase == Phase.stopped})
    plan = reconcile(spec(), status, observed)
    assert not of(plan, StartAttempt)
    assert (plan.status.attempt, plan.status.restarts) == (status.attempt, status.restarts)  # nothing decided yet
    if status.phase != Phase.stopped:
        reason, message = progressing(plan.status)
        assert reason == Reason.waiting_for_pods.value and "pods of attempt" in message

    gone = Observed(**{**observed.__dict__, "pods_left": (), "strays": {},
                       "attempt": AttemptState(number=status.attempt, state="absent")})
    [start] = of(reconcile(spec(), plan.status, gone), StartAttempt)
    # never the number of an attempt that existed, recorded in status or not: its folder may hold
    # checkpoints the new attempt must not overwrite
    assert start.number == max(status.attempt, *extra.get("strays", {0: ()})) + 1


def test_a_failed_attempt_restarts_once_its_pods_are_gone_and_counts_one_restart() -> None:
    waiting = reconcile(spec(), RUNNING, obs(1, "failed", pods_left=(1,)))
    again = reconcile(spec(), waiting.status, obs(1, "failed", pods_left=(1,)))
    assert again.status == waiting.status and not of(again, StartAttempt)
    done = reconcile(spec(), again.status, obs(1, "failed"))
    assert [a.number for a in of(done, StartAttempt)] == [2]
    degraded = next(c for c in done.status.conditions if c.type == "Degraded")
    assert done.status.restarts == 1 and "exited with code 1" in degraded.message


def test_objects_of_other_attempts_are_swept_and_reported() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=2, base_metrics=BASE)
    plan = reconcile(spec(), status, obs(2, "running", strays={1: ("ConfigMap", "Job"), 3: ("Job", "Service")}))
    assert of(plan, Sweep) == [Sweep((1, 3))]
    events = {(e.type, e.message) for e in of(plan, Emit) if e.reason == Reason.stray_swept.value}
    assert ("Normal", "deleted what was left of attempt 1 (ConfigMap, Job)") in events
    assert any(t == "Warning" and m.startswith("deleted attempt 3 (Job, Service)") for t, m in events)
    assert plan.status.attempt == 2 and not of(plan, StartAttempt)


def test_an_attempt_folder_that_holds_checkpoints_is_never_reused() -> None:
    # an attempt 2 was created, wrote a checkpoint and was swept before status recorded it
    swept = CheckpointEvals(name="attempt-002/step-00000010", step=10, attempt=2)
    plan = reconcile(spec(), RUNNING, Observed(attempt=AttemptState(number=1, state="failed", message="x"),
                                               now=NOW, base=BASE, checkpoints=(swept,)))
    [start] = of(plan, StartAttempt)
    assert start.number == 3 and plan.status.attempt == 3 and plan.status.attempts_seen == 3


def test_a_finished_run_still_sweeps() -> None:
    status = CptRunStatus(phase=Phase.succeeded, attempt=2, base_metrics=BASE)
    plan = reconcile(spec(), status, obs(2, "succeeded", strays={1: ("Job",)}))
    assert of(plan, Sweep) == [Sweep((1,))]


def test_the_survivors_of_a_failed_attempt_are_released_without_their_grace() -> None:
    from cpt_operator.reconcile import Release, StopAttempt

    plan = reconcile(spec(), RUNNING, obs(1, "failed", pods_left=(1,)))
    assert of(plan, Release) == [Release(1)]  # they cannot save without the failed rank
    assert not of(plan, StartAttempt) and not of(plan, StopAttempt)  # the Job and its failure stay
    gone = reconcile(spec(), RUNNING, obs(1, "failed"))
    assert not of(gone, Release) and of(gone, StartAttempt)
    older = reconcile(spec(), RUNNING_2, obs(2, "absent", pods_left=(1,)))
    assert not of(older, Release)  # another attempt's pods: swept, not released
