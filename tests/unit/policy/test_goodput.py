"""A run's wall time by cause: each ending of an attempt, the sum that equals the wall time, and
the reconcile core folding attempts in as they end."""
from __future__ import annotations

import math

import pytest

from cpt_api.goodput import CAUSES, Cause, Goodput, TrainerTimes
from cpt_api.status import CptRunStatus, Phase
from cpt_operator.policy.goodput import account, attempt_seconds
from cpt_operator.reconcile import AttemptState, Observed, StartAttempt, reconcile

from tests.unit.reconcile.test_reconcile import BASE, of, spec

T0 = 1_000_000.0


def times(**kw: float) -> TrainerTimes:
    """A trainer that started 10 s after its attempt, ran steps 0-20 and reported 100 s later."""
    fields = {"began": T0 + 10, "reported": T0 + 110, "first_step": 0, "step": 20, "restoring": 15.0,
              "steps": 60.0, "committed": 45.0, "evaluating": 12.0, "checkpointing": 5.0, **kw}
    return TrainerTimes.model_validate(fields)


@pytest.mark.parametrize("ending, kept_step, expected", [
    pytest.param("running", None, {Cause.productive: 60, Cause.other: 8 + 20}, id="running: every step counts"),
    pytest.param("finished", None, {Cause.productive: 60, Cause.other: 8 + 20}, id="finished"),
    pytest.param("failed", None, {Cause.productive: 45, Cause.lost_steps: 15, Cause.failures: 20, Cause.other: 8},
                 id="failed: the steps after the last checkpoint are lost"),
    pytest.param("rollback", 5, {Cause.productive: 15, Cause.rollbacks: 45 + 20, Cause.other: 8},
                 id="rollback into this attempt: the steps up to the target stay"),
    pytest.param("rollback", None, {Cause.productive: 0, Cause.rollbacks: 60 + 20, Cause.other: 8},
                 id="rollback to the base or another attempt: no step stays"),
])
def test_each_ending_sorts_the_same_attempt_into_causes_that_sum_to_its_wall_time(ending, kept_step, expected):
    out = attempt_seconds(T0, T0 + 130, times(), ending, kept_step)
    assert math.isclose(sum(out.values()), 130.0)
    fixed = {Cause.starting: 10, Cause.restoring: 15, Cause.evaluating: 12, Cause.checkpointing: 5}
    for cause in CAUSES:
        assert out[cause.value] == pytest.approx({**fixed, **expected}.get(cause, 0.0)), cause


def test_an_attempt_whose_trainer_never_reported_was_starting_all_along():
    out = attempt_seconds(T0, T0 + 42, None, "failed")
    assert out[Cause.starting.value] == 42 and sum(out.values()) == 42


def test_in_place_restarts_measured_by_the_trainer_are_their_own_causes():
    out = attempt_seconds(T0, T0 + 130, times(lost_steps=3.0, failures=4.0, steps=53.0, committed=40.0), "finished")
    assert out[Cause.lost_steps.value] == 3 and out[Cause.failures.value] == 4
    assert math.isclose(sum(out.values()), 130.0)


def test_the_share_is_productive_over_every_cause():
    g = account(Goodput(since=T0, ended={"productive": 30.0, "starting": 10.0}), T0 + 100,
                {"productive": 40.0, "other": 20.0})
    assert g.seconds == {"productive": 70.0, "starting": 10.0, "other": 20.0}
    assert g.share == pytest.approx(0.7) and g.until == T0 + 100


def at(seconds: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(T0 + seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def observed(number: int, state: str, now: float, report: TrainerTimes | None = None) -> Observed:
    return Observed(attempt=AttemptState(number=number, state=state, times=report,  # type: ignore[arg-type]
                                         message="pod x exited with code 137"), now=at(now), base=BASE)


def test_reconcile_folds_a_failed_attempt_in_when_the_next_starts_and_keeps_the_last_report():
    first = reconcile(spec(), CptRunStatus(), observed(0, "absent", 0)).status
    assert first.goodput.since == T0 and first.attempt == 1
    report = times(began=T0 + 10, reported=T0 + 110)
    running = reconcile(spec(), first, observed(1, "running", 120, report)).status
    assert running.goodput.last == report and running.goodput.share is not None
    # the trainer is gone, and with it its metrics: the kept report still accounts for it
    plan = reconcile(spec(), running, observed(1, "failed", 130))
    assert of(plan, StartAttempt) and plan.status.attempt == 2
    g = plan.status.goodput
    assert g.attempts == 1 and g.last is None
    assert g.ended[Cause.lost_steps.value] == 15 and g.ended[Cause.failures.value] == 20
    assert sum(g.seconds.values()) == pytest.approx(130.0)


def test_the_account_is_frozen_when_the_run_ends_and_counts_in_place_restarts():
    status = CptRunStatus(phase=Phase.running, attempt=1, attempt_started_at=at(0), base_metrics=BASE,
                          goodput=Goodput(since=T0))
    report = times(restarts=2)
    ending = reconcile(spec(), status, Observed(
        attempt=AttemptState(number=1, state="running", times=report), now=at(130), base=BASE,
        stop_requested=True)).status
    assert ending.phase == Phase.stopped and ending.in_place_restarts == 2
    assert sum(ending.goodput.seconds.values()) == pytest.approx(130.0)
    later = reconcile(spec(), ending, observed(1, "stopped", 500, report)).status
    assert later.goodput == ending.goodput and later.in_place_restarts == 2
