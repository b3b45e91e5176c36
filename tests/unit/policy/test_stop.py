"""Stop rules: plateau, no improvement over the base, and exhausted rollbacks."""
from __future__ import annotations

import pytest

from cpt_operator.policy import plateau_reason
from cpt_operator.policy.stop import no_improvement_reason, rollbacks_exhausted
from tests.unit.policy.policy_cases import BASE, build_spec, point

PLATEAU = {"stopPolicy": {"plateau": {"suite": "domain", "epsilon": 0.01, "evals": 3}}}


def domain(*values: float, attempt: int = 1) -> list:
    return [point(100 * (i + 1), attempt, domain__perplexity=v) for i, v in enumerate(values)]


CASES = [
    pytest.param(domain(20.0, 19.0, 18.99, 18.98, 18.97), True, id="three gains below 1 percent in a row are a plateau"),
    pytest.param(domain(20.0, 19.0, 18.99, 18.98), False, id="two small gains after a big one are not yet a plateau"),
    pytest.param(domain(20.0, 19.99, 19.5, 19.49, 19.48), False, id="one gain above epsilon inside the window prevents it"),
    pytest.param(domain(20.0, 20.1, 20.2, 20.3), True, id="a worsening domain metric is a plateau too"),
    pytest.param(domain(20.0, 20.0, 20.0), False, id="too few evaluations are never a plateau"),
    pytest.param(domain(20.0, 19.99) + domain(19.98, 19.97, attempt=2), False, id="evaluations of an earlier attempt do not count"),
]


@pytest.mark.parametrize("points, plateaued", CASES)
def test_plateau(points: list, plateaued: bool) -> None:
    assert (plateau_reason(build_spec(**PLATEAU), points, attempt=points[-1].attempt) is not None) is plateaued


def test_no_plateau_rule_means_no_plateau() -> None:
    assert plateau_reason(build_spec(), domain(20.0, 20.0, 20.0, 20.0, 20.0, 20.0), 1) is None


NO_GAIN = {"stopPolicy": {"noImprovement": {"evals": 3}}}
NO_GAIN_2PC = {"stopPolicy": {"noImprovement": {"evals": 2, "minGain": 0.02}}}

# the base's domain perplexity is 20: below it is a gain
NO_GAIN_CASES = [
    pytest.param(NO_GAIN, domain(21.0, 20.5, 20.0), True, id="three evaluations no better than the base end the run"),
    pytest.param(NO_GAIN, domain(21.0, 20.5), False, id="two are not yet enough"),
    pytest.param(NO_GAIN, domain(21.0, 19.9, 20.5), False, id="one gain inside the window keeps the run going"),
    pytest.param(NO_GAIN, domain(19.0, 21.0, 21.0, 21.0), True, id="an early gain that was lost does not count"),
    pytest.param(NO_GAIN, domain(21.0, 21.0) + domain(21.0, attempt=2), False, id="a rollback starts the count again"),
    pytest.param(NO_GAIN_2PC, domain(19.8, 19.7), True, id="gains below minGain do not pay"),
    pytest.param(NO_GAIN_2PC, domain(19.8, 19.5), False, id="a gain above minGain does"),
    pytest.param({}, domain(25.0, 25.0, 25.0, 25.0), False, id="without the rule the budget is spent"),
]


@pytest.mark.parametrize("extra, points, ends", NO_GAIN_CASES)
def test_no_improvement_over_the_base(extra: dict, points: list, ends: bool) -> None:
    reason = no_improvement_reason(build_spec(**extra), BASE, points, attempt=points[-1].attempt)
    assert (reason is not None) is ends
    if ends:
        assert "no improvement" in reason and "per token" in reason


def test_no_improvement_needs_the_base_evaluation() -> None:
    base = {k: v for k, v in BASE.items() if not k.startswith("domain.")}
    assert no_improvement_reason(build_spec(**NO_GAIN), base, domain(30.0, 30.0, 30.0), 1) is None


@pytest.mark.parametrize("spent, exhausted", [
    pytest.param(2, False, id="two of three rollbacks spent leaves one"),
    pytest.param(3, True, id="three of three rollbacks spent is exhausted"),
])
def test_rollbacks_exhausted(spent: int, exhausted: bool) -> None:
    assert (rollbacks_exhausted(build_spec(), spent) is not None) is exhausted
