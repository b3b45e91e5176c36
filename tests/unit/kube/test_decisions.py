"""What the cluster backend adds to the reconcile core: alerts as gate breaches, stops that
repeat after a crash, and status patches that only carry what changed."""
from __future__ import annotations

from cpt_api.alerts import HANDLED_ALERTS_KEPT, AlertRef
from cpt_api.status import CptRunStatus, Overrides, Phase
from cpt_operator.kube.client import merge_patch
from cpt_operator.policy.types import CheckpointEvals, EvalPoint
from cpt_operator.reconcile import AttemptState, Emit, Observed, StartAttempt, StopAttempt, reconcile

from .cases import build_spec

GOOD = "attempt-001/step-00000050"


def running(attempt: int = 1, **extra) -> Observed:
    points = [EvalPoint(attempt=1, step=50, metrics={"general.perplexity": 10.0, "legal.perplexity": 28.0},
                        checkpoint=GOOD)]
    return Observed(attempt=AttemptState(number=attempt, state="running"), now="2026-01-01T00:00:00Z",
                    base={"general.perplexity": 10.0, "legal.perplexity": 30.0}, points=points,
                    checkpoints=[CheckpointEvals(name=GOOD, step=50, evals=dict(points[0].metrics))], **extra)


def started(phase: Phase = Phase.running) -> CptRunStatus:
    return CptRunStatus(phase=phase, attempt=1, base_metrics={"general.perplexity": 10.0, "legal.perplexity": 30.0})


def alert(gate: str = "general-regression", attempt: int = 1, key: str = "f00d@2026-01-01T00:00:00Z") -> AlertRef:
    return AlertRef(gate=gate, attempt=attempt, key=key)


def test_an_alert_naming_a_gate_rolls_back_with_that_gates_adjustments():
    plan = reconcile(build_spec(), started(), running(alerts=(alert(),)))
    assert plan.status.phase == Phase.rolling_back
    assert plan.status.restore_from == GOOD
    assert plan.status.overrides == Overrides(lr_scale=0.5, replay_delta=0.1, rewarm_from=50)  # re-warms from there
    assert plan.status.history[-1].gate == "general-regression"
    assert plan.status.handled_alerts == [alert().key]
    assert any(isinstance(a, StopAttempt) for a in plan.actions)


def test_an_alert_naming_a_gate_the_spec_does_not_define_does_nothing_and_says_why():
    plan = reconcile(build_spec(), started(), running(alerts=(alert("GeneralPerplexityHigh"),)))
    assert plan.status.phase == Phase.running and plan.status.rollbacks == 0
    assert not any(isinstance(a, StopAttempt) for a in plan.actions)
    [dropped] = [a for a in plan.actions if isinstance(a, Emit) and a.reason == "AlertDropped"]
    assert "'GeneralPerplexityHigh' is not defined" in dropped.message and "general-regression" in dropped.message


def test_an_alert_about_an_attempt_that_already_ended_is_dropped():
    obs = running(alerts=(alert(),))
    ended = Observed(**{**obs.__dict__, "attempt": AttemptState(number=1, state="succeeded")})
    plan = reconcile(build_spec(), started(), ended)
    assert plan.status.rollbacks == 0


def test_an_alert_recorded_for_an_earlier_attempt_does_not_roll_back_the_current_one():
    status = started().model_copy(update={"attempt": 2})
    plan = reconcile(build_spec(), status, running(attempt=2, alerts=(alert(attempt=1),)))
    assert plan.status.rollbacks == 0 and plan.status.phase == Phase.running
    assert any(isinstance(a, Emit) and "about attempt 1, not 2" in a.message for a in plan.actions)


def test_the_same_alert_acts_once_however_often_it_is_re_sent():
    spec = build_spec()
    first = reconcile(spec, started(), running(alerts=(alert(), alert()))).status
    assert first.rollbacks == 1 and len(first.history) == 1
    # attempt 2 runs; the repeated alert is bound to attempt 1 and its key is remembered
    restarted = reconcile(spec, first, Observed(**{**running().__dict__,
                                                   "attempt": AttemptState(number=1, state="stopped")})).status
    assert restarted.attempt == 2 and restarted.phase == Phase.running
    for repeat in (alert(), alert(attempt=2)):
        again = reconcile(spec, restarted, running(attempt=2, alerts=(repeat,)))
        assert again.status.rollbacks == 1 and again.status.phase == Phase.running


def test_handled_alert_keys_are_bounded():
    status = started().model_copy(update={"handled_alerts": [f"k{i}" for i in range(HANDLED_ALERTS_KEPT)]})
    plan = reconcile(build_spec(), status, running(alerts=(alert(key="new"),)))
    assert len(plan.status.handled_alerts) == HANDLED_ALERTS_KEPT and plan.status.handled_alerts[-1] == "new"


def test_a_rollback_whose_stop_was_lost_issues_the_stop_again():
    status = reconcile(build_spec(), started(), running(alerts=(alert(),))).status
    again = reconcile(build_spec(), status, running())
    assert [a for a in again.actions if isinstance(a, (StopAttempt, StartAttempt))] == \
        [StopAttempt(1, f"rollback to {GOOD}", checkpoint=False)]
    assert again.status.rollbacks == 1  # the decision is not taken twice


def test_merge_patch_removes_what_is_gone_and_keeps_what_is_equal():
    old = {"phase": "Running", "restoreFrom": "a/b", "overrides": {"lrScale": 1, "replayDelta": 0.0},
           "conditions": [{"type": "Ready"}]}
    new = {"phase": "Running", "overrides": {"lrScale": 0.5, "replayDelta": 0.0},
           "conditions": [{"type": "Ready"}, {"type": "GateBreached"}]}
    assert merge_patch(old, new) == {"restoreFrom": None, "overrides": {"lrScale": 0.5},
                                     "conditions": [{"type": "Ready"}, {"type": "GateBreached"}]}
    assert merge_patch(new, dict(new)) == {}
