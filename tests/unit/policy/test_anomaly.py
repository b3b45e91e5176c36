"""Anomaly rollbacks: the data first (restart before the spike, skip the blamed windows, keep
the LR), the LR only when anomalies outlive the skipped data."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.skips import DataSkip, merge_skips
from cpt_api.status import Overrides
from cpt_operator.policy import BASE, Action, CheckpointEvals, Observations, decide
from cpt_operator.policy.anomaly import anomaly_target, anomaly_tune
from tests.unit.policy.policy_cases import BASE as BASE_EVALS
from tests.unit.policy.policy_cases import build_spec, general, point

# The step-100 checkpoint breaches the gate (+20 %, within its hysteresis of 2): lastGood is
# the base, but it is the stable checkpoint before the spike at step 150.
GATE = {"name": "general-ppl", "suite": "general", "threshold": 0.05, "consecutive": 2}
JUNK = DataSkip(source="dom", start=9000, end=12000, attempt=1, step=150)
LATER = DataSkip(source="dom", start=20000, end=21000, attempt=1, step=260)


def ckpt(step: int, attempt: int = 1, stable: bool = True) -> CheckpointEvals:
    return CheckpointEvals(name=f"a{attempt}-step-{step}", step=step, attempt=attempt,
                           stable=stable)


def observe(**kw: Any) -> Observations:
    points = general(12.0) + [point(200, checkpoint="a1-step-200", stable=False,
                                    domain__perplexity=25.0)]
    # step 120 was never evaluated: still a checkpoint to go back to
    checkpoints = (ckpt(100), ckpt(120), ckpt(200, stable=False))
    return Observations(**({"attempt": 1, "base": BASE_EVALS, "points": points,
                            "checkpoints": checkpoints,
                            "anomalies": {"restored": 2, "loss_spike": 6}} | kw))


def test_blamed_restores_roll_back_to_the_stable_checkpoint_before_the_spike_and_keep_the_lr() -> None:
    decision = decide(build_spec([GATE]), observe(skips=(JUNK, LATER)))
    assert decision.action == Action.rollback
    assert decision.target == "a1-step-120"
    assert decision.overrides == Overrides(lr_scale=1.0, skips=[JUNK, LATER])
    (record,) = decision.records
    assert record.gate == "anomaly-restores" and "dom" in record.reason
    assert any("skipping 2 data window(s) of dom" in r for r in decision.reasons)


def test_anomalies_that_recur_after_the_windows_were_skipped_halve_the_lr() -> None:
    skipping = Overrides(skips=[JUNK])
    decision = decide(build_spec([GATE]), observe(skips=(LATER, LATER), overrides=skipping))
    assert decision.overrides.lr_scale == pytest.approx(0.5)
    assert decision.overrides.skips == [JUNK, LATER]


def test_a_restore_no_source_explains_halves_the_lr() -> None:
    decision = decide(build_spec([GATE]), observe(skips=(JUNK,)))
    assert decision.overrides.lr_scale == pytest.approx(0.5)
    assert decision.target == "a1-step-120"


def test_a_gate_rollback_keeps_the_windows_already_skipped() -> None:
    fired = {**GATE, "consecutive": 1}
    obs = observe(anomalies={}, overrides=Overrides(skips=[JUNK]), points=general(12.0))
    decision = decide(build_spec([fired]), obs)
    assert decision.target == BASE and decision.overrides.skips == [JUNK]


@pytest.mark.parametrize("checkpoints, found, start, target", [
    pytest.param([ckpt(100), ckpt(140), ckpt(200)], [JUNK], BASE, "a1-step-140",
                 id="the newest checkpoint saved before the spike"),
    pytest.param([ckpt(100, stable=False)], [JUNK], "a0/c50", "a0/c50",
                 id="an unstable checkpoint is passed over for the attempt's start"),
    pytest.param([ckpt(100, attempt=0)], [JUNK], "a0/c50", "a0/c50",
                 id="an earlier attempt's checkpoint is not in this attempt's lineage"),
    pytest.param([ckpt(100)], [], "a0/c50", "a0/c50",
                 id="without a known spike only the start point surely precedes it"),
])
def test_anomaly_target(checkpoints: list[CheckpointEvals], found: list[DataSkip], start: str,
                        target: str) -> None:
    assert anomaly_target(checkpoints, 1, found, start) == target


@pytest.mark.parametrize("restores, found, skipping, lr_factor", [
    pytest.param(2, [JUNK, LATER], [], 1.0, id="every restore blamed on fresh data keeps the lr"),
    pytest.param(2, [JUNK], [], 0.5, id="one unexplained restore halves the lr"),
    pytest.param(2, [LATER, LATER], [JUNK], 0.5, id="recurring in an attempt that already skips halves it"),
    pytest.param(2, [], [], 0.5, id="nothing blamed halves it"),
])
def test_anomaly_tune(restores: int, found: list[DataSkip], skipping: list[DataSkip],
                      lr_factor: float) -> None:
    assert anomaly_tune(restores, found, skipping).lr_factor == lr_factor


def test_a_widened_window_replaces_its_narrower_self() -> None:
    wider = JUNK.model_copy(update={"end": 15000})
    assert merge_skips([JUNK], [wider, LATER]) == [wider, LATER]
    assert merge_skips([wider], [JUNK]) == [wider]
