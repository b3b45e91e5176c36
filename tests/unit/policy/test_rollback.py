"""Rollback targets and the LR / replay adjustments of the next attempt."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.evaluation import TuneSpec
from cpt_api.status import Overrides
from cpt_operator.policy import BASE, adjust, last_good
from tests.unit.policy.policy_cases import BASE as BASE_EVALS
from tests.unit.policy.policy_cases import build_spec, general, point

GATE = {"name": "general-ppl", "suite": "general", "threshold": 0.05}


TARGETS = [
    pytest.param(general(10.1, 10.2, 11.0), "a1-step-200", id="last good is the newest checkpoint that passed every gate"),
    pytest.param(general(11.0, 11.0), BASE, id="with no passing checkpoint the target is the base"),
    pytest.param([], BASE, id="with no checkpoint at all the target is the base"),
    pytest.param(general(10.1) + general(10.3, attempt=2, start=150), "a2-step-150", id="a later attempt's checkpoint is newer than an earlier attempt's higher step"),
    pytest.param(general(10.1) + [point(200, checkpoint="unstable", stable=False, general__perplexity=10.0)], "a1-step-100", id="an unstable checkpoint is never the target"),
    pytest.param(general(10.1) + [point(200, general__perplexity=10.0)], "a1-step-100", id="an evaluation without a checkpoint is never the target"),
]


@pytest.mark.parametrize("points, target", TARGETS)
def test_last_good(points: list[Any], target: str) -> None:
    assert last_good(build_spec([GATE]), BASE_EVALS, points) == target


def test_last_good_with_a_best_baseline_judges_each_checkpoint_against_its_own_past() -> None:
    spec = build_spec([GATE | {"baseline": "best"}])
    # 8.0 sets the best; 8.3 is 3.75% worse (passes), 8.9 is 11% worse (fails).
    assert last_good(spec, BASE_EVALS, general(8.0, 8.3, 8.9)) == "a1-step-200"


ADJUST = [
    pytest.param(Overrides(), [TuneSpec()], 0.2, Overrides(lr_scale=0.5, replay_delta=0.1), id="default tune halves the LR and adds 10 points of replay"),
    pytest.param(Overrides(lr_scale=0.5, replay_delta=0.1), [TuneSpec()], 0.2, Overrides(lr_scale=0.25, replay_delta=0.2), id="adjustments compound over attempts"),
    pytest.param(Overrides(replay_delta=0.6), [TuneSpec(replay_delta=0.3)], 0.2, Overrides(lr_scale=0.5, replay_delta=0.7), id="replay share is capped at 90 percent"),
    pytest.param(Overrides(), [TuneSpec(lr_factor=0.8, replay_delta=0.05), TuneSpec(lr_factor=0.5, replay_delta=0.1)], 0.2, Overrides(lr_scale=0.5, replay_delta=0.1), id="with two gates the strongest adjustment of each kind wins"),
    pytest.param(Overrides(), [TuneSpec()], None, Overrides(lr_scale=0.5, replay_delta=0.0), id="without a replay source only the LR changes"),
    pytest.param(Overrides(lr_scale=0.3, replay_delta=0.05), [], 0.2, Overrides(lr_scale=0.3, replay_delta=0.05), id="nothing fired leaves the overrides alone"),
]


@pytest.mark.parametrize("current, tunes, replay, expected", ADJUST)
def test_adjust(current: Overrides, tunes: list[TuneSpec], replay: float | None,
                expected: Overrides) -> None:
    new, _ = adjust(build_spec(replay=replay), current, tunes)
    assert new.lr_scale == pytest.approx(expected.lr_scale)
    assert new.replay_delta == pytest.approx(expected.replay_delta)


def test_adjust_says_when_it_capped_or_could_not_add_replay() -> None:
    _, capped = adjust(build_spec(), Overrides(replay_delta=0.65), [TuneSpec()])
    _, absent = adjust(build_spec(replay=None), Overrides(), [TuneSpec()])
    assert "capped" in capped[0] and "no replay source" in absent[0]
