"""Gates: thresholds, baselines, hysteresis and missing data."""
from __future__ import annotations

import math
from typing import Any

import pytest

from cpt_operator.policy import EvalPoint, judge_gates, passes_all
from tests.unit.policy.policy_cases import BASE, build_spec, general, point


def gate(**kw: Any) -> dict[str, Any]:
    return {"name": "general-ppl", "suite": "general", "threshold": 0.05} | kw


JUDGED = [
    pytest.param(gate(), [10.9], True, 0.09, id="relative gate breaches when general ppl rises 9% with a 5% limit"),
    pytest.param(gate(), [10.4], False, 0.04, id="relative gate holds when general ppl rises 4%"),
    pytest.param(gate(), [9.0], False, -0.10, id="an improvement is a negative regression"),
    pytest.param(gate(relative=False, threshold=2.0), [12.5], True, 2.5, id="absolute gate breaches when ppl rises by more than its threshold"),
    pytest.param(gate(relative=False, threshold=2.0), [12.0], False, 2.0, id="absolute gate holds at exactly its threshold"),
    pytest.param(gate(baseline="best"), [8.0, 8.8], True, 0.1, id="best baseline compares with the best earlier value, not the base"),
    pytest.param(gate(baseline="best"), [11.0, 10.4], False, 0.04, id="best baseline starts from the base when no evaluation beat it"),
    pytest.param(gate(), [math.nan], True, math.inf, id="a non-finite metric breaches"),
]


@pytest.mark.parametrize("gate_doc, values, breached, reg", JUDGED)
def test_gate_judges_the_newest_evaluation(gate_doc: dict[str, Any], values: list[float],
                                           breached: bool, reg: float) -> None:
    outcomes, warnings = judge_gates(build_spec([gate_doc]), BASE, general(*values), attempt=1)
    assert warnings == []
    (outcome,) = outcomes
    assert outcome.breached is breached
    assert outcome.regression == pytest.approx(reg)


def test_higher_is_better_metric_breaches_when_it_falls() -> None:
    spec = build_spec([{"name": "refusals", "suite": "safety", "threshold": 0.05,
                        "relative": False}])
    outcomes, _ = judge_gates(spec, BASE, [point(100, safety__refusal_rate=0.8)], attempt=1)
    assert outcomes[0].fired and outcomes[0].regression == pytest.approx(0.1)


HYSTERESIS = [
    pytest.param([11.0, 11.0], 3, 2, False, id="two breaches in a row do not fire a three-evaluation gate"),
    pytest.param([11.0, 11.0, 11.0], 3, 3, True, id="three breaches in a row fire it"),
    pytest.param([11.0, 11.0, 10.0, 11.0], 3, 1, False, id="a recovery in between resets the streak"),
    pytest.param([11.0], 1, 1, True, id="consecutive 1 fires on the first breach"),
]


@pytest.mark.parametrize("values, consecutive, streak, fired", HYSTERESIS)
def test_hysteresis(values: list[float], consecutive: int, streak: int, fired: bool) -> None:
    spec = build_spec([gate(consecutive=consecutive)])
    (outcome,), _ = judge_gates(spec, BASE, general(*values), attempt=1)
    assert (outcome.streak, outcome.fired) == (streak, fired)


def test_breaches_of_an_earlier_attempt_do_not_count() -> None:
    history = general(11.0, 11.0, attempt=1) + general(11.0, attempt=2, start=300)
    (outcome,), _ = judge_gates(build_spec([gate(consecutive=2)]), BASE, history, attempt=2)
    assert (outcome.streak, outcome.fired) == (1, False)


def test_evaluations_without_the_metric_are_skipped_inside_a_streak() -> None:
    history = general(11.0) + [point(150, domain__perplexity=19.0)] + general(11.0, start=200)
    (outcome,), _ = judge_gates(build_spec([gate(consecutive=2)]), BASE, history, attempt=1)
    assert outcome.fired


MISSING = [
    pytest.param({}, general(11.0), "no base baseline", id="a base evaluation without the metric gives a warning"),
    pytest.param(BASE, general(11.0) + [point(300, domain__perplexity=19.0)], "has no general.perplexity", id="a newest evaluation without the metric gives a warning"),
]


@pytest.mark.parametrize("base, history, warning", MISSING)
def test_missing_metrics_give_no_decision_and_a_warning(base: dict[str, float], history: list[Any],
                                                        warning: str) -> None:
    outcomes, warnings = judge_gates(build_spec([gate()]), base, history, attempt=1)
    assert outcomes == []
    assert len(warnings) == 1 and warning in warnings[0]


def test_an_attempt_without_evaluations_has_no_outcome_and_no_warning() -> None:
    assert judge_gates(build_spec([gate()]), BASE, general(11.0), attempt=2) == ([], [])


def test_relative_gate_on_a_zero_baseline_applies_its_threshold_absolutely() -> None:
    spec = build_spec([{"name": "drift", "suite": "chat", "threshold": 0.2}])
    outcomes, warnings = judge_gates(spec, BASE, [point(100, chat__kl_to_base=0.3)], attempt=1)
    assert outcomes[0].fired and outcomes[0].regression == pytest.approx(0.3)
    assert not outcomes[0].relative and "absolute" in warnings[0]


PASSES = [
    pytest.param([gate()], {"general.perplexity": 10.2}, True, id="a checkpoint within every limit passes"),
    pytest.param([gate()], {"general.perplexity": 11.0}, False, id="a checkpoint over a limit fails"),
    pytest.param([gate()], {"domain.perplexity": 15.0}, False, id="a checkpoint that cannot be judged does not pass"),
    pytest.param([], {}, True, id="with no gates every checkpoint passes"),
]


@pytest.mark.parametrize("gates, metrics, passed", PASSES)
def test_passes_all(gates: list[dict[str, Any]], metrics: dict[str, float], passed: bool) -> None:
    history = [EvalPoint(attempt=1, step=100, metrics=metrics, checkpoint="c")]
    assert passes_all(build_spec(gates), BASE, history, 0) is passed
