"""Stop rules: when training should end even though no gate fired.

* Plateau (`stopPolicy.plateau`): let `v_0 … v_n` be the plateau suite's metric over the
  current attempt's evaluations. The relative gain of evaluation `i` is
  `(v_{i-1} - v_i) / |v_{i-1}|` (sign flipped for higher-is-better metrics). When the last
  `evals` gains are all below `epsilon`, the domain no longer improves enough to pay for more
  tokens: the run finishes and a checkpoint is selected. Needs `evals + 1` values, so a young
  attempt never plateaus; evaluations without the metric are skipped.
* No improvement (`stopPolicy.noImprovement`): the domain gain over the base `g_domain` (the
  mean over the domain suites of `metrics.normalised_gain`, as checkpoint selection has it) of
  each of the current attempt's last `evals` evaluations is at most `minGain`: the tokens are
  not paying, so the run finishes and the choice (usually the base) is made now rather than at
  the end of the budget. Evaluations without every domain metric are skipped; a rollback starts
  the count again, since the next attempt trains differently.
* Rollbacks exhausted: a gate or anomaly rule asks for another rollback but `maxRollbacks` have
  been spent: the run stops as Failed ("wait and see" is not a policy).
* Budget: the trainer reached its token / step budget: the run finishes.
"""
from __future__ import annotations

import math

from typing import Mapping, Sequence

from cpt_api.evaluation import Metric, SuiteKind
from cpt_api.spec import CptRunSpec
from cpt_api.metrics import metric_key, normalised_gain, relative_undefined, worse_by
from .types import EvalPoint, ordered


def plateau_reason(spec: CptRunSpec, points: Sequence[EvalPoint], attempt: int) -> str | None:
    """Why the current attempt has plateaued, or None."""
    rule = spec.stop_policy.plateau
    suite = spec.suites_by_name().get(rule.suite) if rule else None
    if rule is None or suite is None:
        return None
    key = metric_key(suite)
    values = [p.metrics[key] for p in ordered(points) if p.attempt == attempt
              and math.isfinite(p.metrics.get(key, math.nan))]
    if len(values) < rule.evals + 1:
        return None
    gains = [_relative_gain(suite.metric, before, after)
             for before, after in zip(values[-rule.evals - 1:-1], values[-rule.evals:])]
    if max(gains) >= rule.epsilon:
        return None
    return (f"plateau: {key} improved by less than {rule.epsilon:.2%} per evaluation for "
            f"{rule.evals} evaluations (best recent gain {max(gains):+.2%})")


def no_improvement_reason(spec: CptRunSpec, base: Mapping[str, float], points: Sequence[EvalPoint],
                          attempt: int) -> str | None:
    """Why the current attempt's domain has not improved over the base for long enough, or None."""
    rule = spec.stop_policy.no_improvement
    suites = [s for s in spec.suites_by_name().values() if s.kind == SuiteKind.domain]
    if rule is None or not suites or not all(math.isfinite(base.get(metric_key(s), math.nan)) for s in suites):
        return None
    gains: list[tuple[float, EvalPoint]] = []
    for point in ordered(points):
        values = [point.metrics.get(metric_key(s), math.nan) for s in suites]
        if point.attempt == attempt and all(math.isfinite(v) for v in values):
            gain = sum(normalised_gain(s.metric, v, base[metric_key(s)]) for s, v in zip(suites, values))
            gains.append((gain / len(suites), point))
    recent = gains[-rule.evals:]
    if len(recent) < rule.evals or any(gain > rule.min_gain for gain, _ in recent):
        return None
    gain, point = recent[-1]
    rate = f" ({gain / point.tokens:+.3g} per token)" if point.tokens else ""
    return (f"no improvement: the domain gained at most {rule.min_gain:+.2%} over the base in each of "
            f"{rule.evals} evaluations (latest {gain:+.2%} after {point.tokens:,} tokens{rate})")


def _relative_gain(metric: Metric, before: float, after: float) -> float:
    gain = -worse_by(metric, after, before)
    return gain if relative_undefined(before) else gain / abs(before)


def rollbacks_exhausted(spec: CptRunSpec, rollbacks: int) -> str | None:
    limit = spec.stop_policy.max_rollbacks
    if rollbacks < limit:
        return None
    return f"{rollbacks} rollback(s) already spent (stopPolicy.maxRollbacks = {limit})"
