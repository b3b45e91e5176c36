"""decide(): one decision from gates, anomalies, budget and plateau, in a fixed precedence."""
from __future__ import annotations

import random
from typing import Any

import pytest

from cpt_api.status import Overrides, Phase
from cpt_operator.policy import BASE, Action, Observations, decide
from tests.unit.policy.policy_cases import BASE as BASE_EVALS
from tests.unit.policy.policy_cases import build_spec, general, point

GATE = {"name": "general-ppl", "suite": "general", "threshold": 0.05}


def observe(points: list[Any], **kw: Any) -> Observations:
    return Observations(**({"attempt": 1, "base": BASE_EVALS, "points": points} | kw))


CASES = [
    pytest.param([GATE], {}, observe(general(10.1, 10.2)), Action.cont, None, None, id="within limits the run continues"),
    pytest.param([GATE], {}, observe(general(10.1, 11.0)), Action.rollback, "a1-step-100", None, id="a fired gate rolls back to the last good checkpoint"),
    pytest.param([GATE | {"rollbackTo": "base"}], {}, observe(general(10.1, 11.0)), Action.rollback, BASE, None, id="a gate asking for the base rolls back to the base"),
    pytest.param([GATE | {"action": "tune"}], {}, observe(general(10.1, 11.0)), Action.tune, "a1-step-200", None, id="a tune gate restarts from the newest checkpoint"),
    pytest.param([GATE | {"action": "stop"}], {}, observe(general(11.0)), Action.stop, None, Phase.stopped, id="a stop gate stops the run"),
    pytest.param([GATE], {}, observe(general(11.0), rollbacks=3), Action.stop, None, Phase.failed, id="a fired gate with rollbacks exhausted stops the run as failed"),
    pytest.param([GATE], {}, observe(general(10.1), budget_reached=True), Action.finish, None, Phase.succeeded, id="the budget reached finishes the run"),
    pytest.param([GATE], {}, observe(general(11.0), budget_reached=True), Action.rollback, BASE, None, id="a fired gate comes before the budget"),
    pytest.param([GATE | {"consecutive": 2}], {}, observe(general(11.0), budget_reached=True), Action.finish, None, Phase.succeeded, id="a breach inside its hysteresis does not hold up the finish"),
    pytest.param([], {"stopPolicy": {"plateau": {"suite": "general", "evals": 2}}}, observe(general(10.0, 10.0, 10.0)), Action.finish, None, Phase.succeeded, id="a plateau finishes the run"),
    pytest.param([], {"stopPolicy": {"noImprovement": {"evals": 2}}}, observe([point(100, domain__perplexity=21.0), point(200, domain__perplexity=22.0)]), Action.finish, None, Phase.succeeded, id="no domain gain over the base finishes the run"),
    pytest.param([GATE], {"stopPolicy": {"noImprovement": {"evals": 1}}}, observe([point(100, domain__perplexity=21.0, general__perplexity=11.0)]), Action.rollback, "base", None, id="a fired gate comes before no improvement"),
    pytest.param([], {}, observe([], anomalies={"restored": 2}), Action.rollback, BASE, None, id="repeated restores in one attempt roll back"),
    pytest.param([], {}, observe(general(10.0), anomalies={"restored": 1, "grad_norm": 7}), Action.cont, None, None, id="one restore and skipped spikes are left to the trainer"),
    pytest.param([], {"gradient": {"anomaly": {"onNonFinite": "rollback"}}}, observe(general(10.0), anomalies={"non_finite": 1}), Action.rollback, "a1-step-100", None, id="a non-finite step rolls back when onNonFinite says so"),
    pytest.param([], {"gradient": {"anomaly": {"onNonFinite": "stop"}}}, observe([], anomalies={"non_finite": 1}), Action.stop, None, Phase.stopped, id="a non-finite step stops when onNonFinite says so"),
    pytest.param([], {}, observe([], anomalies={"non_finite": 4}), Action.cont, None, None, id="non-finite steps are only skipped by default"),
]


@pytest.mark.parametrize("gates, extra, obs, action, target, phase", CASES)
def test_decide(gates: list[dict[str, Any]], extra: dict[str, Any], obs: Observations,
                action: Action, target: str | None, phase: Phase | None) -> None:
    decision = decide(build_spec(gates, **extra), obs)
    assert (decision.action, decision.target, decision.phase) == (action, target, phase)
    assert decision.reasons or action == Action.cont


def test_rollback_carries_records_and_adjusted_overrides() -> None:
    obs = observe(general(10.1, 11.0), attempt=1, overrides=Overrides(lr_scale=0.5))
    decision = decide(build_spec([GATE]), obs)
    (rec,) = decision.records
    assert decision.overrides == Overrides(lr_scale=0.25, replay_delta=0.1)
    assert (rec.attempt, rec.gate, rec.metric, rec.target) == (1, "general-ppl", "general.perplexity", "a1-step-100")
    assert (rec.value, rec.baseline, rec.overrides) == (11.0, 10.0, decision.overrides)
    assert decision.breached[0].gate == "general-ppl"


def test_two_gates_firing_together_give_two_records_and_one_adjustment() -> None:
    gates = [GATE, {"name": "safety", "suite": "safety", "threshold": 0.05, "relative": False}]
    points = [point(100, checkpoint="c", general__perplexity=11.0, safety__refusal_rate=0.5)]
    decision = decide(build_spec(gates), observe(points))
    assert [r.gate for r in decision.records] == ["general-ppl", "safety"]
    assert decision.overrides == Overrides(lr_scale=0.5, replay_delta=0.1)


def test_a_breach_inside_the_hysteresis_is_reported_but_does_not_act() -> None:
    decision = decide(build_spec([GATE | {"consecutive": 3}]), observe(general(11.0, 11.0)))
    assert decision.action == Action.cont and decision.records == ()
    assert "2/3 in a row" in decision.reasons[0]


def test_the_same_observations_give_the_same_decision_in_any_order() -> None:
    points = general(10.1, 10.2, 11.0, 9.0, 11.5) + general(10.0, 11.2, attempt=2, start=350)
    spec = build_spec([GATE | {"consecutive": 2}])
    first = decide(spec, observe(points, attempt=2))
    shuffled = list(points)
    random.Random(7).shuffle(shuffled)
    assert decide(spec, observe(shuffled, attempt=2)) == first
    assert decide(spec, observe(points, attempt=2)) == first


MISSING = [
    pytest.param({}, general(11.0), id="an empty base evaluation"),
    pytest.param(BASE_EVALS, [point(100, checkpoint="c", unknown__metric=1.0)], id="evaluations with unknown keys only"),
    pytest.param(BASE_EVALS, [point(100, general__perplexity=float("nan"), domain__perplexity=float("inf"))], id="non-finite values"),
]


@pytest.mark.parametrize("base, points", MISSING)
def test_missing_or_odd_metrics_never_crash(base: dict[str, float], points: list[Any]) -> None:
    spec = build_spec([GATE, GATE | {"name": "best", "baseline": "best"}],
                      stopPolicy={"plateau": {"suite": "domain", "evals": 1}})
    decision = decide(spec, observe(points, base=base))
    assert decision.action in set(Action)
    if decision.action == Action.cont:
        assert decision.warnings
