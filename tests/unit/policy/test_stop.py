"""Stop rules: plateau and exhausted rollbacks."""
from __future__ import annotations

import pytest

from cpt_operator.policy import plateau_reason
from cpt_operator.policy.stop import rollbacks_exhausted
from tests.unit.policy.policy_cases import build_spec, point

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


@pytest.mark.parametrize("spent, exhausted", [
    pytest.param(2, False, id="two of three rollbacks spent leaves one"),
    pytest.param(3, True, id="three of three rollbacks spent is exhausted"),
])
def test_rollbacks_exhausted(spent: int, exhausted: bool) -> None:
    assert (rollbacks_exhausted(build_spec(), spent) is not None) is exhausted
