"""Regression gates: is a metric worse than its baseline by more than the gate allows?

For a gate on suite `s` (metric `m`, key `s.m`), each evaluation point `i` with value `v_i` is
compared with a baseline `b_i`:

* `baseline: base` — the base model's reference evaluation;
* `baseline: best` — the best value of `m` seen so far in the run *before* point `i` (the base
  reference and every earlier evaluation of any attempt), "best" in the metric's direction
  (`api.evaluation.LOWER_IS_BETTER`).

The regression `r_i` is `v_i - b_i` (or `b_i - v_i` for higher-is-better metrics), divided by
`|b_i|` when the gate is relative. Point `i` breaches when `r_i > threshold`.

Hysteresis: the gate *fires* only when the newest `consecutive` evaluations of the current
attempt that carry the metric all breach. Counting restarts with each attempt, because a new
attempt is a new trajectory (restored weights, other LR / replay).

Missing data never crashes and never decides: no baseline, or a newest evaluation without the
metric, gives no outcome for that gate and a warning saying why.
"""
from __future__ import annotations

import math

from typing import Mapping, Sequence

from cpt_api.evaluation import Baseline, GateSpec, SuiteSpec
from cpt_api.spec import CptRunSpec
from cpt_api.metrics import better, metric_key, regression, relative_undefined
from .types import EvalPoint, GateOutcome

Judged = tuple[float, float, float]
"""(value, baseline, regression) of one point."""



def baseline_at(gate: GateSpec, suite: SuiteSpec, base: Mapping[str, float],
                history: Sequence[EvalPoint], index: int) -> float | None:
    """The value point `history[index]` is compared with (None: nothing to compare with)."""
    key = metric_key(suite)
    best = base.get(key)
    if gate.baseline == Baseline.base:
        return best
    for point in history[:index]:
        value = point.metrics.get(key)
        if value is not None and math.isfinite(value):
            best = value if best is None else better(suite.metric, best, value)
    return best


def judge_point(gate: GateSpec, suite: SuiteSpec, base: Mapping[str, float],
                history: Sequence[EvalPoint], index: int) -> Judged | str:
    """(value, baseline, regression) of one point, or why it cannot be judged."""
    key = metric_key(suite)
    value = history[index].metrics.get(key)
    if value is None:
        return f"gate {gate.name}: step {history[index].step} has no {key}; not judged"
    reference = baseline_at(gate, suite, base, history, index)
    if reference is None:
        return f"gate {gate.name}: no {gate.baseline.value} baseline for {key}; not judged"
    return value, reference, regression(suite.metric, value, reference, gate.relative)


def judge_gate(gate: GateSpec, suite: SuiteSpec, base: Mapping[str, float],
               history: Sequence[EvalPoint], attempt: int) -> GateOutcome | str | None:
    """The gate on the current attempt's newest evaluation; a warning string; or None when
    the attempt has not been evaluated yet."""
    mine = [i for i, p in enumerate(history) if p.attempt == attempt]
    if not mine:
        return None
    newest = judge_point(gate, suite, base, history, mine[-1])
    if isinstance(newest, str):
        return newest
    streak = _streak(gate, suite, base, history, mine)
    value, reference, reg = newest
    return GateOutcome(gate=gate.name, metric=metric_key(suite), value=value,
                       baseline=reference, regression=reg, threshold=gate.threshold,
                       relative=gate.relative and not relative_undefined(reference),
                       streak=streak, consecutive=gate.consecutive,
                       step=history[mine[-1]].step)


def _streak(gate: GateSpec, suite: SuiteSpec, base: Mapping[str, float],
            history: Sequence[EvalPoint], mine: Sequence[int]) -> int:
    """Breaching evaluations in a row, counted back from the newest; points without the
    metric are skipped rather than breaking the run of breaches."""
    streak = 0
    for index in reversed(mine):
        judged = judge_point(gate, suite, base, history, index)
        if isinstance(judged, str):
            continue
        if judged[2] <= gate.threshold:
            break
        streak += 1
    return streak


def judge_gates(spec: CptRunSpec, base: Mapping[str, float], history: Sequence[EvalPoint],
                attempt: int) -> tuple[list[GateOutcome], list[str]]:
    """Every gate of the spec on the current attempt: outcomes and warnings."""
    suites = spec.suites_by_name()
    outcomes: list[GateOutcome] = []
    warnings: list[str] = []
    for gate in spec.gates:
        suite = suites.get(gate.suite)
        result = None if suite is None else judge_gate(gate, suite, base, history, attempt)
        if suite is None:
            warnings.append(f"gate {gate.name}: suite {gate.suite} is not defined; not judged")
        elif isinstance(result, str):
            warnings.append(result)
        elif result is not None:
            warnings.extend(_zero_baseline_warning(gate, result))
            outcomes.append(result)
    return outcomes, warnings


def _zero_baseline_warning(gate: GateSpec, outcome: GateOutcome) -> list[str]:
    if gate.relative and not outcome.relative:
        return [f"gate {gate.name}: baseline of {outcome.metric} is 0, so the relative "
                f"threshold {gate.threshold} is applied as an absolute one"]
    return []


def passes_all(spec: CptRunSpec, base: Mapping[str, float], history: Sequence[EvalPoint],
               index: int) -> bool:
    """Did point `history[index]` pass every gate against its own baseline? (No hysteresis:
    a checkpoint is only trusted if it is itself within limits. A metric that cannot be
    judged counts as not passed: an unverified checkpoint is not 'good'.)"""
    return not failed_gates(spec, base, history, index)


def failed_gates(spec: CptRunSpec, base: Mapping[str, float], history: Sequence[EvalPoint],
                 index: int) -> list[str]:
    """The gates point `history[index]` does not pass (see `passes_all`), in spec order; one that
    cannot be judged is named with "(not judged)"."""
    suites = spec.suites_by_name()
    failed = []
    for gate in spec.gates:
        suite = suites.get(gate.suite)
        judged = None if suite is None else judge_point(gate, suite, base, history, index)
        if judged is None or isinstance(judged, str):
            failed.append(f"{gate.name} (not judged)")
        elif judged[2] > gate.threshold:
            failed.append(gate.name)
    return failed
