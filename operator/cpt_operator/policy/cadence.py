"""How often to save, from what a run has seen: the save's stall and the interval between
failures (Young 1974, Daly 2006). Saving more often loses fewer steps to each failure and stalls
training more; the optimum balances the two. Pure: `cptctl status` prints it.
"""
from __future__ import annotations

import math

from cpt_api.status import CptRunStatus


def daly_interval(stall_s: float, mtbf_s: float) -> float:
    """Seconds of training between saves that waste the least time: Daly's higher-order form of
    Young's sqrt(2 * stall * MTBF), for a save stall `stall_s` and a mean time between failures
    `mtbf_s`."""
    if stall_s <= 0:
        return 0.0
    if stall_s >= 2 * mtbf_s:
        return mtbf_s
    young = math.sqrt(2 * stall_s * mtbf_s)
    return young * (1 + math.sqrt(stall_s / (2 * mtbf_s)) / 3 + stall_s / (18 * mtbf_s)) - stall_s


def advice(status: CptRunStatus, every: int) -> str | None:
    """A line on the checkpoint cadence, once the run has failed at least once and its trainer
    has saved (None before: there is no rate to go by)."""
    times, goodput = status.goodput.last, status.goodput
    failures = status.restarts + status.in_place_restarts
    wall = sum(goodput.seconds.values())
    steps = times.step - times.first_step if times else 0
    if times is None or failures == 0 or times.saves == 0 or wall <= 0 or steps <= 0 or times.steps <= 0:
        return None
    stall, mtbf = times.checkpointing / times.saves, wall / failures
    step_s = times.steps / steps
    best = daly_interval(stall, mtbf)
    return (f"cadence:     saves stall {stall:.1f} s; {failures} failure(s) in {wall / 3600:.1f} h (one every "
            f"{mtbf / 3600:.1f} h): a save every {best:.0f} s wastes least (Young/Daly), about "
            f"{max(1, round(best / step_s))} steps; checkpoint.every is {every}")
