"""What the cluster backend adds to the reconcile core: alerts as gate breaches, stops that
repeat after a crash, and status patches that only carry what changed."""
from __future__ import annotations

from cpt_operator.api.status import CptRunStatus, Overrides, Phase
from cpt_operator.kube.client import merge_patch
from cpt_operator.policy.types import CheckpointEvals, EvalPoint
from cpt_operator.reconcile import AttemptState, Observed, StartAttempt, StopAttempt, reconcile

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


def test_an_alert_naming_a_gate_rolls_back_with_that_gates_adjustments():
    plan = reconcile(build_spec(), started(), running(alerts=("general-regression",)))
    assert plan.status.phase == Phase.rolling_back
    assert plan.status.restore_from == GOOD
    assert plan.status.overrides == Overrides(lr_scale=0.5, replay_delta=0.1)
    assert plan.status.history[-1].gate == "general-regression"
    assert any(isinstance(a, StopAttempt) for a in plan.actions)


def test_an_alert_naming_an_unknown_gate_still_rolls_back_to_the_last_good_checkpoint():
    plan = reconcile(build_spec(), started(), running(alerts=("GeneralPerplexityHigh",)))
    assert plan.status.phase == Phase.rolling_back and plan.status.restore_from == GOOD
    assert plan.status.history[-1].gate == "GeneralPerplexityHigh"


def test_an_alert_about_an_attempt_that_already_ended_is_dropped():
    obs = running(alerts=("general-regression",))
    ended = Observed(**{**obs.__dict__, "attempt": AttemptState(number=1, state="succeeded")})
    plan = reconcile(build_spec(), started(), ended)
    assert plan.status.rollbacks == 0


def test_a_rollback_whose_stop_was_lost_issues_the_stop_again():
    status = reconcile(build_spec(), started(), running(alerts=("general-regression",))).status
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
