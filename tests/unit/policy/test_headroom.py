"""Gate headroom: threshold minus regression, in the gate's units, at each gate's newest point."""
from __future__ import annotations

import math

import pytest

from cpt_api.spec import CptRunSpec
from cpt_operator.policy.headroom import headroom
from cpt_operator.policy.types import EvalPoint

BASE = {"general.perplexity": 40.0, "json.json_valid": 0.75}


def spec() -> CptRunSpec:
    return CptRunSpec.model_validate({
        "baseModel": {"uri": "/m"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "/d"}]},
        "budget": {"steps": 10}, "schedule": {"warmupSteps": 1},
        "evaluation": {"suites": [
            {"name": "general", "kind": "general", "uri": "/g"},
            {"name": "json", "kind": "behavior", "uri": "/j", "metric": "json_valid"}]},
        "gates": [{"name": "general-ppl", "suite": "general", "threshold": 0.1},
                  {"name": "json", "suite": "json", "threshold": 0.25, "relative": False}]})


def point(step: int, **metrics: float) -> EvalPoint:
    return EvalPoint(attempt=1, step=step, metrics={k.replace("_", ".", 1): v for k, v in metrics.items()})


def test_a_relative_gate_reports_the_share_of_the_base_left() -> None:
    (ppl, js) = headroom(spec(), BASE, [point(3, general_perplexity=42.0, json_json_valid=0.625)])
    assert (ppl.gate, ppl.left, ppl.relative) == ("general-ppl", pytest.approx(0.05), True)
    assert ppl.text() == "general-ppl +5.0%"
    assert (js.left, js.relative, js.text()) == (pytest.approx(0.125), False, "json +0.125")


def test_a_breach_is_negative_and_a_diverged_model_says_breached() -> None:
    (ppl,) = headroom(spec(), BASE, [point(3, general_perplexity=60.0)])
    assert ppl.left == pytest.approx(-0.4)
    (nan,) = headroom(spec(), BASE, [point(3, general_perplexity=math.nan)])
    assert nan.text() == "general-ppl breached"


def test_each_gate_reads_the_newest_point_that_has_its_metric() -> None:
    history = [point(3, general_perplexity=41.0, json_json_valid=0.5), point(6, general_perplexity=44.0)]
    rooms = {h.gate: h for h in headroom(spec(), BASE, history)}
    assert rooms["general-ppl"].value == 44.0 and rooms["json"].value == 0.5


def test_gates_without_a_base_or_a_point_are_left_out() -> None:
    assert headroom(spec(), {}, [point(3, general_perplexity=41.0)]) == []
    assert headroom(spec(), BASE, []) == []
