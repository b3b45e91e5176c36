"""The checkpoint cadence from a run's own save stall and failure rate (Young/Daly)."""
from __future__ import annotations

import math

import pytest

from cpt_api.goodput import Goodput, TrainerTimes
from cpt_api.status import CptRunStatus
from cpt_operator.policy.cadence import advice, daly_interval


def test_daly_refines_young_and_is_the_least_wasteful_interval():
    stall, mtbf = 10.0, 3600.0
    best = daly_interval(stall, mtbf)
    assert best == pytest.approx(261.7, abs=0.1)
    assert abs(best - math.sqrt(2 * stall * mtbf)) < 0.05 * best  # close to Young's sqrt(2 d M)

    def waste(tau: float) -> float:  # stall per save plus, per failure, half an interval lost
        return stall / tau + (tau + stall) / (2 * mtbf)

    assert waste(best) <= min(waste(best * f) for f in (0.5, 0.8, 1.25, 2.0))
    assert daly_interval(0.0, mtbf) == 0.0 and daly_interval(8000.0, 3600.0) == 3600.0


def test_the_advice_waits_for_a_failure_and_a_save_then_names_steps():
    times = TrainerTimes(began=0.0, reported=7200.0, first_step=0, step=1000, steps=6000.0,
                         checkpointing=100.0, saves=10)
    status = CptRunStatus(goodput=Goodput(seconds={"productive": 6000.0, "other": 1200.0}, last=times))
    assert advice(status, every=100) is None  # no failure yet: no rate to go by
    status.restarts, status.in_place_restarts = 1, 1
    line = advice(status, every=100)
    assert line is not None
    # stall 10 s, one failure an hour: 262 s of 6 s steps
    assert "saves stall 10.0 s" in line and "about 44 steps" in line and "checkpoint.every is 100" in line
