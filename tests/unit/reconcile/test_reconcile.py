"""The reconcile core walks a run through its phases; same inputs, same plan."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api import CptRunSpec, CptRunStatus, Phase
from cpt_api.alerts import AlertRef
from cpt_api.spec import RestoreMode
from cpt_operator.policy.types import CheckpointEvals, EvalPoint
from cpt_operator.reconcile import AttemptState, Emit, Observed, Pin, StartAttempt, StopAttempt, reconcile

NOW = "2026-11-23T10:00:00Z"
BASE = {"legal.perplexity": 20.0, "general.perplexity": 10.0}


def spec(**over: Any) -> CptRunSpec:
    doc: dict[str, Any] = {
        "baseModel": {"uri": "/m", "format": "hf"},
        "data": {"sources": [{"name": "legal", "role": "domain", "uri": "/d/*.txt", "weight": 0.8},
                             {"name": "general", "role": "replay", "uri": "/g/*.txt", "weight": 0.2}]},
        "budget": {"steps": 100},
        "schedule": {"warmupSteps": 5},
        "evaluation": {"every": 10, "suites": [
            {"name": "legal", "kind": "domain", "uri": "/e/l.jsonl"},
            {"name": "general", "kind": "general", "uri": "/e/g.jsonl"}]},
        "gates": [{"name": "general-regression", "suite": "general", "threshold": 0.1,
                   "action": "rollback", "rollbackTo": "lastGood",
                   "tune": {"lrFactor": 0.5, "replayDelta": 0.1}}],
        "stopPolicy": {"maxRollbacks": 2, "maxAttemptRestarts": 1},
    }
    doc.update(over)
    return CptRunSpec.model_validate(doc)


def running(number: int = 1, **kw: Any) -> AttemptState:
    return AttemptState(number=number, state="running", **kw)


def point(step: int, general: float, attempt: int = 1, legal: float = 15.0) -> EvalPoint:
    return EvalPoint(attempt=attempt, step=step, metrics={"legal.perplexity": legal, "general.perplexity": general},
                     checkpoint=f"attempt-{attempt:03d}/step-{step:08d}")


def ckpt(p: EvalPoint) -> CheckpointEvals:
    assert p.checkpoint
    return CheckpointEvals(name=p.checkpoint, step=p.step, evals=dict(p.metrics), attempt=p.attempt)


def observed(attempt: AttemptState, points: tuple[EvalPoint, ...] = (), **kw: Any) -> Observed:
    return Observed(attempt=attempt, now=NOW, base=BASE, points=points,
                    checkpoints=tuple(ckpt(p) for p in points), **kw)


def of(plan: Any, kind: type) -> list[Any]:
    return [a for a in plan.actions if isinstance(a, kind)]


def test_a_new_run_starts_attempt_one_from_the_base() -> None:
    plan = reconcile(spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent")))
    [start] = of(plan, StartAttempt)
    assert (start.number, start.restore_from, start.restore_mode) == (1, None, RestoreMode.weights_only)
    assert plan.status.phase == Phase.running and plan.status.attempt == 1


def test_reconcile_is_idempotent_while_healthy() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    obs = observed(running(step=10), (point(10, 10.2),))
    first = reconcile(spec(), status, obs)
    second = reconcile(spec(), first.status, obs)
    assert not of(first, StartAttempt) and not of(first, StopAttempt)
    assert first.status == second.status and first.actions == second.actions


def test_a_breached_gate_rolls_back_to_the_last_good_checkpoint_with_lower_lr_and_more_replay() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.3), point(20, 12.5))  # 25% worse than base on general
    plan = reconcile(spec(), status, observed(running(step=20), points))
    assert of(plan, StopAttempt) and plan.status.phase == Phase.rolling_back
    assert plan.status.overrides.rewarm_from == 10  # the next attempt warms up again from there
    assert plan.status.restore_from == "attempt-001/step-00000010"
    assert plan.status.overrides.lr_scale == pytest.approx(0.5)
    assert plan.status.overrides.replay_delta == pytest.approx(0.1)
    assert plan.status.rollbacks == 1 and plan.status.history[-1].gate == "general-regression"
    assert {c.type for c in plan.status.conditions} >= {"GateBreached", "RolledBack"}
    # once the old attempt is gone, the next one starts from that checkpoint, full state
    again = reconcile(spec(), plan.status, observed(AttemptState(number=1, state="stopped"), points))
    [start] = of(again, StartAttempt)
    assert (start.number, start.restore_from, start.restore_mode) == (2, "attempt-001/step-00000010",
                                                                       RestoreMode.full_state)
    assert start.overrides.lr_scale == pytest.approx(0.5)
    assert again.status.phase == Phase.running


def test_a_failed_attempt_restarts_from_its_newest_checkpoint_then_gives_up() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.1),)
    failed = AttemptState(number=1, state="failed", message="node lost")
    plan = reconcile(spec(), status, observed(failed, points))
    [start] = of(plan, StartAttempt)
    assert start.restore_from == "attempt-001/step-00000010" and plan.status.restarts == 1
    failed2 = AttemptState(number=2, state="failed", message="node lost again")
    plan2 = reconcile(spec(), plan.status, observed(failed2, points))
    assert not of(plan2, StartAttempt) and plan2.status.phase == Phase.failed
    assert "restarts used" in plan2.status.message


def test_budget_reached_finishes_with_a_checkpoint_chosen_on_the_frontier() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.2, legal=16.0), point(20, 10.4, legal=14.0))
    done = AttemptState(number=1, state="succeeded", step=20)
    plan = reconcile(spec(), status, observed(done, points))
    assert plan.status.phase == Phase.succeeded
    assert plan.status.best_checkpoint in plan.status.frontier
    assert "chosen checkpoint" in plan.status.message
    pins = of(plan, Pin)
    assert pins and plan.status.best_checkpoint in pins[0].names


def test_a_run_with_nothing_better_than_the_base_succeeds_without_a_chosen_checkpoint() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.2, legal=21.0), point(20, 10.4, legal=22.0))  # the domain got worse
    plan = reconcile(spec(), status, observed(running(step=20), points))
    improved = next(c for c in plan.status.conditions if c.type == "Improved")
    assert (improved.status, improved.reason) == ("False", "NoImprovement")
    assert "closest attempt-001/step-00000010: domain -5.00% over the base" in improved.message
    assert plan.status.phase == Phase.running and plan.status.best_checkpoint == "base"
    done = reconcile(spec(), plan.status, observed(AttemptState(number=1, state="succeeded", step=20), points))
    assert done.status.phase == Phase.succeeded and done.status.best_checkpoint == "base"
    assert "no checkpoint is better than the base, so none is chosen" in done.status.message
    [warning] = [e for e in of(done, Emit) if e.reason == "NoImprovement"]
    assert warning.type == "Warning" and "closest attempt-001/step-00000010" in warning.message
    assert all("base" not in pin.names for pin in of(done, Pin))
    assert "chosen base (no checkpoint is better than the base)" in done.status.describe("r")


def test_a_checkpoint_better_than_the_base_is_named_in_the_improved_condition() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(step=10), (point(10, 10.1, legal=16.0),)))
    improved = next(c for c in plan.status.conditions if c.type == "Improved")
    assert (improved.status, improved.reason) == ("True", "BetterThanBase")
    assert improved.message.startswith("attempt-001/step-00000010 is better than the base: domain +20.00%")


def test_no_improvement_over_the_base_ends_the_run_early_when_asked() -> None:
    asked = spec(stopPolicy={"noImprovement": {"evals": 2}})
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.2, legal=21.0), point(20, 10.4, legal=22.0))
    plan = reconcile(asked, status, observed(running(step=20), points))
    assert plan.status.phase == Phase.succeeded and plan.status.best_checkpoint == "base"
    assert of(plan, StopAttempt) and "no improvement: the domain gained at most" in plan.status.message


def test_a_stop_request_stops_the_attempt_and_the_run() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(), stop_requested=True))
    assert of(plan, StopAttempt) and plan.status.phase == Phase.stopped


def test_an_interrupted_run_resumes_from_its_latest_checkpoint() -> None:
    status = CptRunStatus(phase=Phase.stopped, attempt=1, base_metrics=BASE)
    points = (point(10, 10.1), point(20, 10.1))
    plan = reconcile(spec(), status, observed(AttemptState(number=1, state="stopped"), points, resume=True))
    [start] = of(plan, StartAttempt)
    assert (start.number, start.restore_from, start.restore_mode) == (2, "attempt-001/step-00000020",
                                                                       RestoreMode.full_state)
    assert plan.status.restarts == 0


def test_a_manual_rollback_to_an_unknown_checkpoint_is_refused_with_an_event() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(), (point(10, 10.0),), rollback_to="attempt-009/step-1"))
    assert plan.status.phase == Phase.running and not of(plan, StopAttempt)
    assert any(e.reason == "RollbackRefused" for e in of(plan, Emit))


def test_a_manual_rollback_to_base_restarts_weights_only() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(), (point(10, 10.0),), rollback_to="base"))
    assert plan.status.phase == Phase.rolling_back and plan.status.restore_from is None
    nxt = reconcile(spec(), plan.status, observed(AttemptState(number=1, state="stopped")))
    [start] = of(nxt, StartAttempt)
    assert start.restore_from is None and start.restore_mode == RestoreMode.weights_only


def test_a_terminal_run_only_makes_sure_its_attempt_is_gone() -> None:
    status = CptRunStatus(phase=Phase.succeeded, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running()))
    assert of(plan, StopAttempt) and not of(plan, StartAttempt)
    assert plan.status.phase == Phase.succeeded


# -- a person's rollback before anything automatic --------------------------------------------
MANUAL = "attempt-001/step-00000010"


def test_a_manual_rollback_wins_over_a_breached_gate_and_an_alert_in_the_same_pass() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.0), point(20, 10.2), point(30, 12.5))  # gate breached at step 30
    alert = AlertRef(gate="general-regression", attempt=1, key="f00d@2026-11-23T09:59:00Z")
    plan = reconcile(spec(), status, observed(running(step=30), points, rollback_to=MANUAL, alerts=(alert,)))
    assert plan.status.restore_from == MANUAL and plan.status.rollbacks == 1
    assert [r.gate for r in plan.status.history] == ["manual"]
    assert plan.status.overrides.lr_scale == 1.0  # no gate's tuning either


def test_no_automatic_rollback_overrides_a_manual_one_in_the_next_passes() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.0), point(20, 12.5))
    late = AlertRef(gate="general-regression", attempt=1, key="f00d@2026-11-23T09:59:00Z")
    manual = reconcile(spec(), status, observed(running(step=20), points, rollback_to=MANUAL)).status
    # the next pass: the old attempt still runs, its breach is still in the metrics, an alert arrives
    nxt = reconcile(spec(), manual, observed(running(step=20), points, alerts=(late,))).status
    assert (nxt.restore_from, nxt.rollbacks, nxt.phase) == (MANUAL, 1, Phase.rolling_back)
    # then the requested attempt starts, and the alert about the attempt it replaced is dropped
    started = reconcile(spec(), nxt, observed(AttemptState(number=1, state="stopped"), points)).status
    assert started.attempt == 2 and started.restore_from == MANUAL
    after = reconcile(spec(), started, observed(running(number=2), points, alerts=(late,)))
    assert after.status.phase == Phase.running and after.status.rollbacks == 1 and not of(after, StopAttempt)
    assert [r.gate for r in after.status.history] == ["manual"]


def test_a_restart_pins_its_restore_point_before_it_starts() -> None:
    # step 20 breaches the gate and is dominated: neither last good, chosen nor on the frontier,
    # yet the restarted attempt continues from it and may have to again
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    points = (point(10, 10.1, legal=15.0), point(20, 12.0, legal=18.0))
    plan = reconcile(spec(), status, observed(AttemptState(number=1, state="failed"), points))
    [start] = of(plan, StartAttempt)
    assert start.restore_from == "attempt-001/step-00000020"
    assert "attempt-001/step-00000020" not in plan.status.frontier
    assert isinstance(plan.actions[0], Pin), "pins go first: the new attempt's trainer prunes by them"
    assert set(plan.actions[0].names) == {"attempt-001/step-00000010", "attempt-001/step-00000020"}
    # and how far it has judged: retention may delete nothing newer than what it has weighed
    assert plan.actions[0].judged == (("attempt-001", 20),)
    again = reconcile(spec(), plan.status, observed(running(2), points))
    assert "attempt-001/step-00000020" in of(again, Pin)[0].names  # for as long as attempt 2 may restart
