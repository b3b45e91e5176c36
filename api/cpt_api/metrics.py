"""Metric keys, directions and normalised changes shared by gates, stop rules, selection and the
trainer's dashboard metrics (one definition, so a limit drawn on a dashboard is the one enforced).

Every evaluation reports `suite.metric` -> value. Two ways of comparing a value with a
reference are used:

* `regression(...)`: how much *worse* a value is than a baseline, in the metric's own units
  (absolute) or as a fraction of the baseline (relative). Positive means worse. Gates compare
  it with their threshold.
* `normalised_gain(...)`: how much *better* a value is than the base model's, on a scale that
  is comparable across metrics: perplexity / NLL change relative to the base (a 10% lower
  perplexity is +0.10), rates and KL as plain differences (they already live on a fixed scale,
  and a base rate of 0 would make a relative change undefined). Selection and the Pareto
  frontier use it.
"""
from __future__ import annotations

import math
from typing import Mapping

from .evaluation import BENCHMARK_METRICS, CODE_METRICS, LOWER_IS_BETTER, Baseline, GateSpec, Metric, SuiteSpec

# Rates are shares in [0, 1] and KL is in nats: their differences are already normalised.
_ABSOLUTE_SCALE = {Metric.json_valid, Metric.format_follow, Metric.refusal_rate, Metric.kl_to_base,
                   *CODE_METRICS, *BENCHMARK_METRICS}
# A baseline this close to zero cannot carry a relative threshold.
ZERO = 1e-12


def metric_key(suite: SuiteSpec) -> str:
    """The key the evaluator reports this suite's metric under."""
    return f"{suite.name}.{suite.metric.value}"


def lower_is_better(metric: Metric) -> bool:
    return metric in LOWER_IS_BETTER


def worse_by(metric: Metric, value: float, reference: float) -> float:
    """Signed amount by which `value` is worse than `reference` (metric units; >0 is worse)."""
    return value - reference if lower_is_better(metric) else reference - value


def regression(metric: Metric, value: float, baseline: float, relative: bool) -> float:
    """How much worse `value` is than `baseline`: absolute, or as a fraction of |baseline|.

    A non-finite value counts as infinitely worse. A relative comparison against a zero baseline
    (e.g. KL-to-base of the base itself) falls back to the absolute difference; callers warn
    about it via `relative_undefined`.
    """
    if not math.isfinite(value):
        return math.inf  # a diverged model (inf / NaN perplexity) breaches every limit
    delta = worse_by(metric, value, baseline)
    if relative and not relative_undefined(baseline):
        return delta / abs(baseline)
    return delta


def relative_undefined(baseline: float) -> bool:
    return abs(baseline) < ZERO


def gate_limit(gate: GateSpec, suite: SuiteSpec, base: Mapping[str, float]) -> float | None:
    """The value at which a `baseline: base` gate breaches, in the metric's units, for drawing
    it: `regression(value, base) > threshold` exactly when value is beyond it. None when the gate
    compares with the best so far (its limit moves) or the base has not been measured."""
    if gate.baseline != Baseline.base:
        return None
    ref = base.get(metric_key(suite))
    if ref is None:
        return None
    delta = gate.threshold * abs(ref) if gate.relative and not relative_undefined(ref) else gate.threshold
    return ref + delta if lower_is_better(suite.metric) else ref - delta


def normalised_gain(metric: Metric, value: float, base: float) -> float:
    """Improvement over the base on a cross-metric scale (>0 is better); see the module doc."""
    delta = -worse_by(metric, value, base)
    if metric in _ABSOLUTE_SCALE or relative_undefined(base):
        return delta
    return delta / abs(base)


def better(metric: Metric, a: float, b: float) -> float:
    """The better of two values of `metric`."""
    return min(a, b) if lower_is_better(metric) else max(a, b)
