"""The limit a dashboard draws for a gate is the one the policy enforces (one definition)."""
from __future__ import annotations

import pytest

from cpt_api.evaluation import GateSpec, SuiteSpec
from cpt_api.metrics import gate_limit, metric_key, regression

CASES = [
    # (suite kind, metric, relative, threshold, base value)
    ("general", "perplexity", True, 0.25, 40.0),
    ("general", "perplexity", False, 2.0, 40.0),
    ("drift", "kl_to_base", True, 0.5, 0.0),        # KL of the base to itself: relative is undefined
    ("safety", "refusal_rate", False, 0.1, 0.9),    # a rate where higher is better
    ("safety", "refusal_rate", True, 0.1, 0.0),     # a base that refuses nothing
]


@pytest.mark.parametrize("kind,metric,relative,threshold,base_value", CASES)
def test_values_beyond_the_drawn_limit_are_exactly_the_breaches(kind, metric, relative, threshold, base_value):
    suite = SuiteSpec.model_validate({"name": "s", "kind": kind, "metric": metric, "uri": "x"})
    gate = GateSpec.model_validate({"name": "g", "suite": "s", "threshold": threshold,
                                    "relative": relative, "baseline": "base"})
    base = {metric_key(suite): base_value}
    limit = gate_limit(gate, suite, base)
    assert limit is not None
    for offset in (-1e-3, 1e-3):
        value = limit + offset
        breached = regression(suite.metric, value, base_value, relative) > threshold
        beyond = value > limit if suite.metric.value in ("perplexity", "kl_to_base") else value < limit
        assert breached == beyond, (value, limit)


def test_no_limit_to_draw_without_a_base_or_for_a_moving_baseline():
    suite = SuiteSpec.model_validate({"name": "s", "kind": "general", "uri": "x"})
    gate = GateSpec.model_validate({"name": "g", "suite": "s", "threshold": 0.1, "baseline": "best"})
    assert gate_limit(gate, suite, {metric_key(suite): 10.0}) is None
    assert gate_limit(GateSpec.model_validate({"name": "g", "suite": "s", "threshold": 0.1}), suite, {}) is None
