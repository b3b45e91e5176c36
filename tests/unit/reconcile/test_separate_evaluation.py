"""`evaluation.placement: separate` in the reconcile core: what to evaluate, when the run may end,
and what is said when an evaluation fails for good."""
from __future__ import annotations

from typing import Any

from cpt_api import CptRunStatus, Phase
from cpt_api.status import ConditionType
from cpt_operator.policy.evaluations import EvalRun, plan_evaluations
from cpt_operator.policy.types import CheckpointEvals
from cpt_operator.reconcile import (AttemptState, Emit, Evaluate, Observed, Pin, StartAttempt, StopAttempt,
                                    StopEvaluations, reconcile)
from tests.unit.reconcile.test_reconcile import BASE, NOW, of, running
from tests.unit.reconcile.test_reconcile import spec as inline_spec

GOOD = {"legal.perplexity": 15.0, "general.perplexity": 10.2}
BAD = {"legal.perplexity": 12.0, "general.perplexity": 13.0}  # 30% worse on general: the gate fires


def spec(**over: Any) -> Any:
    base = inline_spec()
    evaluation = base.evaluation.model_copy(update={"placement": "separate", **over})
    return base.model_copy(update={"evaluation": evaluation})


def ckpt(step: int, metrics: dict[str, float] | None = None, attempt: int = 1) -> CheckpointEvals:
    return CheckpointEvals(name=f"attempt-{attempt:03d}/step-{step:08d}", step=step, attempt=attempt,
                           evals=metrics or {}, evaluated=metrics is not None)


def observed(attempt: AttemptState, checkpoints: tuple[CheckpointEvals, ...] = (), base: bool = True,
             **kw: Any) -> Observed:
    from cpt_operator.policy.types import EvalPoint

    points = tuple(EvalPoint(attempt=c.attempt, step=c.step, metrics=c.evals, checkpoint=c.name)
                   for c in checkpoints if c.evaluated)
    return Observed(attempt=attempt, now=NOW, base=BASE if base else {}, points=points, checkpoints=checkpoints,
                    **kw)


def test_the_base_is_evaluated_first_then_checkpoints_oldest_first_within_the_concurrency() -> None:
    cks = (ckpt(20), ckpt(10))
    first = plan_evaluations(base_known=False, checkpoints=cks, runs={}, concurrency=1)
    assert first.start == ("base",) and first.owed == ("base", "attempt-001/step-00000010", "attempt-001/step-00000020")
    busy = plan_evaluations(base_known=False, checkpoints=cks, runs={"base": EvalRun(state="running")},
                            concurrency=1)
    assert busy.start == ()
    beside = plan_evaluations(base_known=False, checkpoints=cks, runs={"base": EvalRun(state="running")},
                              concurrency=2)
    assert beside.start == ("attempt-001/step-00000010",)
    after = plan_evaluations(base_known=True, checkpoints=cks, runs={}, concurrency=1)
    assert after.start == ("attempt-001/step-00000010",)
    both = plan_evaluations(base_known=True, checkpoints=cks, runs={}, concurrency=2)
    assert both.start == ("attempt-001/step-00000010", "attempt-001/step-00000020")


def test_a_failed_base_does_not_hold_the_checkpoints_back_and_nothing_starts_twice() -> None:
    plan = plan_evaluations(base_known=False, checkpoints=(ckpt(10), ckpt(20)),
                            runs={"base": EvalRun(state="failed", message="boom"),
                                  "attempt-001/step-00000010": EvalRun(state="running")},
                            concurrency=2)
    assert plan.failed == (("base", "boom"),)
    assert plan.start == ("attempt-001/step-00000020",)
    assert plan.owed == ("attempt-001/step-00000010", "attempt-001/step-00000020")


def test_a_new_run_starts_its_first_attempt_and_the_base_evaluation_together() -> None:
    plan = reconcile(spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent"), base=False))
    assert of(plan, StartAttempt) and of(plan, Evaluate) == [Evaluate("base", 1)]
    evaluated = plan.status.condition(ConditionType.evaluated)
    assert evaluated is not None and (evaluated.status, evaluated.reason) == ("False", "Evaluating")


def test_inline_placement_starts_no_evaluation() -> None:
    plan = reconcile(inline_spec(), CptRunStatus(), observed(AttemptState(number=0, state="absent"), base=False))
    assert not of(plan, Evaluate) and plan.status.condition(ConditionType.evaluated) is None


def test_a_checkpoint_owed_its_evaluation_is_evaluated_and_pinned() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(step=20), (ckpt(10, GOOD), ckpt(20))))
    assert of(plan, Evaluate) == [Evaluate("attempt-001/step-00000020", 1)]
    [pin] = of(plan, Pin)
    assert "attempt-001/step-00000020" in pin.names


def test_a_late_breach_rolls_back_to_the_last_good_checkpoint_while_training_went_on() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    # step 20's evaluation arrives while the trainer is at step 40 with two more checkpoints
    cks = (ckpt(10, GOOD), ckpt(20, BAD), ckpt(30), ckpt(40))
    plan = reconcile(spec(), status, observed(running(step=40), cks, evaluations={
        "attempt-001/step-00000030": EvalRun(state="running")}))
    assert of(plan, StopAttempt) and plan.status.phase == Phase.rolling_back
    assert plan.status.restore_from == "attempt-001/step-00000010"
    # the old attempt's checkpoints are still evaluated: they stay candidates of the run
    assert not of(plan, StopEvaluations)


def test_a_finished_attempt_waits_for_its_evaluations_and_a_late_breach_still_counts() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    done = AttemptState(number=1, state="succeeded", step=40)
    waiting = reconcile(spec(), status, observed(done, (ckpt(10, GOOD), ckpt(20)), evaluations={
        "attempt-001/step-00000020": EvalRun(state="running")}))
    assert waiting.status.phase == Phase.running and not of(waiting, StartAttempt)
    progressing = waiting.status.condition(ConditionType.progressing)
    assert progressing is not None and progressing.reason == "Evaluating"
    breached = reconcile(spec(), waiting.status, observed(done, (ckpt(10, GOOD), ckpt(20, BAD))))
    assert breached.status.phase == Phase.rolling_back
    fine = reconcile(spec(), waiting.status, observed(done, (ckpt(10, GOOD), ckpt(20, GOOD))))
    assert fine.status.phase == Phase.succeeded
    evaluated = fine.status.condition(ConditionType.evaluated)
    assert evaluated is not None and evaluated.status == "True"


def test_a_failed_evaluation_is_reported_never_chosen_and_does_not_hold_the_end() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    done = AttemptState(number=1, state="succeeded", step=20)
    why = "exit code 1: RuntimeError: out of memory (tried 2 times)"
    plan = reconcile(spec(), status, observed(done, (ckpt(10, GOOD), ckpt(20)), evaluations={
        "attempt-001/step-00000020": EvalRun(state="failed", message=why)}))
    assert plan.status.phase == Phase.succeeded
    assert plan.status.best_checkpoint == "attempt-001/step-00000010"
    evaluated = plan.status.condition(ConditionType.evaluated)
    assert evaluated is not None and (evaluated.status, evaluated.reason) == ("False", "EvaluationFailed")
    assert "attempt-001/step-00000020" in evaluated.message and "out of memory" in evaluated.message
    assert [e for e in of(plan, Emit) if e.reason == "EvaluationFailed"]
    # said once: the next pass with the same failure posts no second event
    again = reconcile(spec(), plan.status, observed(done, (ckpt(10, GOOD), ckpt(20)), evaluations={
        "attempt-001/step-00000020": EvalRun(state="failed", message=why)}))
    assert not [e for e in of(again, Emit) if e.reason == "EvaluationFailed"]


def test_an_ended_run_stops_its_evaluations() -> None:
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)
    plan = reconcile(spec(), status, observed(running(step=20), (ckpt(10, GOOD), ckpt(20)), stop_requested=True,
                                              evaluations={"attempt-001/step-00000020": EvalRun(state="running")}))
    assert plan.status.phase == Phase.stopped
    assert of(plan, StopEvaluations) == [StopEvaluations(("attempt-001/step-00000020",))]
    assert not of(plan, Evaluate)
