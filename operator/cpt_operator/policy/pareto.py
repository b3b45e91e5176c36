"""Checkpoint selection: the Pareto frontier with the base on it, then the product's preference.

Each checkpoint gets a normalised gain over the base per axis (`metrics.normalised_gain`;
several suites of one kind are averaged):

    g_domain, g_general, g_behavior, g_safety      (> 0: better than the base)

so `ΔM_d = g_domain` and `Reg_x = -g_x`. The gate score is

    J(t) = w_d·ΔM_d − w_g·Reg_general − w_b·Reg_behavior − w_s·Reg_safety
         = w_d·g_domain + w_g·g_general + w_b·g_behavior + w_s·g_safety

with the weights of `spec.selection`. Regressions are signed, so a checkpoint that *improves*
general text is preferred to one that merely holds it. The base is a candidate like any
checkpoint: every gain of it is 0, so J(base) = 0.

Frontier: over (g_domain, g_general, g_safety), all maximised, the base included. A point is on
it when no other is at least as good on every axis and strictly better on one; identical points
are all kept. Algorithm: sort by the axes lexicographically, best first; a point can only be
dominated by one sorted before it, and if it is dominated at all it is dominated by a frontier
member (dominance is transitive), so each point is checked against the frontier found so far:
O(n·|frontier|).

Choice: the gates are hard limits, so only checkpoints that pass every gate compete. Among them
and the base, the frontier is taken again (a passing checkpoint that only a breaching one
dominates still competes), and the highest J on it wins if it is above the base's 0; otherwise
the base is the choice ("no improvement"), and the verdict names the closest checkpoint, its
domain gain per token, and what held it back. Ties go to the earlier step, then the name, so the
choice is deterministic. Never simply the last, the domain-best or the lowest-loss one.

Axes whose metric the base evaluation lacks are left out (with a warning); a checkpoint that
lacks a metric an axis needs, or has a non-finite one, is left out of the ranking. Without any
axis (no suites, or no base evaluation) nothing can be compared with the base: the newest
checkpoint is chosen and no verdict is given.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from cpt_api.evaluation import SuiteSpec
from cpt_api.metrics import metric_key, normalised_gain
from cpt_api.spec import CptRunSpec
from cpt_api.status import BASE
from .gates import failed_gates
from .types import CheckpointEvals, EvalPoint, Selection, Verdict

FRONTIER_AXES = ("domain", "general", "safety")
SCORE_AXES = ("domain", "general", "behavior", "safety")


def axis_suites(spec: CptRunSpec, base: Mapping[str, float]) -> tuple[dict[str, list[SuiteSpec]], list[str]]:
    """Axis -> the suites measuring it that the base evaluation can normalise."""
    axes: dict[str, list[SuiteSpec]] = {}
    warnings: list[str] = []
    for suite in spec.evaluation.suites if spec.evaluation else []:
        if suite.kind.value not in SCORE_AXES:
            continue
        if not math.isfinite(base.get(metric_key(suite), math.nan)):
            warnings.append(f"base evaluation has no usable {metric_key(suite)}; suite "
                            f"{suite.name} left out of selection")
            continue
        axes.setdefault(suite.kind.value, []).append(suite)
    return axes, warnings


def gains_of(axes: Mapping[str, Sequence[SuiteSpec]], base: Mapping[str, float],
             evals: Mapping[str, float]) -> dict[str, float] | str:
    """Axis -> mean normalised gain of one checkpoint, or the missing metric."""
    gains: dict[str, float] = {}
    for axis, suites in axes.items():
        values = []
        for suite in suites:
            key = metric_key(suite)
            value = evals.get(key, math.nan)
            if not math.isfinite(value):
                return key
            values.append(normalised_gain(suite.metric, value, base[key]))
        gains[axis] = sum(values) / len(values)
    return gains


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(vectors: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated vectors (all axes maximised), ascending."""
    order = sorted(range(len(vectors)), key=lambda i: [-x for x in vectors[i]])
    front: list[int] = []
    for i in order:
        if not any(dominates(vectors[j], vectors[i]) for j in front):
            front.append(i)
    return sorted(front)


def score(spec: CptRunSpec, gains: Mapping[str, float]) -> float:
    """J(t); an axis with no suite contributes nothing."""
    w = spec.selection
    weights = {"domain": w.domain, "general": w.general, "behavior": w.behavior, "safety": w.safety}
    return sum(weights[axis] * gains.get(axis, 0.0) for axis in SCORE_AXES)


def failing_gates(spec: CptRunSpec, base: Mapping[str, float],
                  checkpoints: Sequence[CheckpointEvals]) -> dict[str, list[str]]:
    """Checkpoint -> the gates it does not pass; `best` baselines use the checkpoints before it."""
    ordered_ckpts = sorted(checkpoints, key=lambda c: (c.attempt, c.step, c.name))
    history = [EvalPoint(attempt=c.attempt, step=c.step, tokens=c.tokens, metrics=c.evals,
                         checkpoint=c.name) for c in ordered_ckpts]
    return {c.name: failed_gates(spec, base, history, i) for i, c in enumerate(ordered_ckpts)}


def select_checkpoint(spec: CptRunSpec, base: Mapping[str, float],
                      checkpoints: Sequence[CheckpointEvals]) -> Selection:
    """Frontier, scores, the choice and the verdict against the base (see the module docstring)."""
    axes, warnings = axis_suites(spec, base)
    gains: dict[str, dict[str, float]] = {}
    for ckpt in sorted(checkpoints, key=lambda c: (c.step, c.name)):
        result = gains_of(axes, base, ckpt.evals)
        if isinstance(result, str):
            warnings.append(f"checkpoint {ckpt.name} has no usable {result}; not ranked")
        else:
            gains[ckpt.name] = result
    scores = {n: score(spec, g) for n, g in gains.items()}
    failing = failing_gates(spec, base, checkpoints)
    passed = {name: not gates for name, gates in failing.items()}
    if not axes:
        # Nothing measured against the base: every checkpoint ties, and the newest holds the most
        # training.
        newest = max(checkpoints, key=lambda c: (c.attempt, c.step, c.name), default=None)
        why = ["no evaluation suites: choosing the newest checkpoint"] if newest else []
        return Selection(frontier=(), scores=scores, gains=gains, passed=passed,
                         chosen=newest.name if newest else None, warnings=tuple(warnings + why))
    used = [a for a in FRONTIER_AXES if a in axes]
    frontier = _front([BASE, *gains], gains, used) if gains else []
    by_name = {c.name: c for c in checkpoints}
    chosen, verdict = _choose(gains, scores, failing, by_name, used)
    return Selection(frontier=tuple(frontier), scores=scores, gains=gains, passed=passed,
                     chosen=chosen, verdict=verdict, warnings=tuple(warnings))


def _front(names: Sequence[str], gains: Mapping[str, Mapping[str, float]], used: Sequence[str]) -> list[str]:
    """The non-dominated names, the base (every gain 0) first, then checkpoints by step."""
    vectors = [[0.0 if n == BASE else gains[n][a] for a in used] for n in names]
    return [names[i] for i in pareto_front(vectors)]


def _choose(gains: Mapping[str, Mapping[str, float]], scores: Mapping[str, float],
            failing: Mapping[str, Sequence[str]], ckpts: Mapping[str, CheckpointEvals],
            used: Sequence[str]) -> tuple[str | None, Verdict | None]:
    if not gains:
        return None, None  # nothing evaluated yet: nothing to compare with the base
    order = lambda n: (-scores[n], ckpts[n].step, n)  # noqa: E731
    eligible = [n for n in _front([BASE, *(n for n in gains if not failing.get(n))], gains, used) if n != BASE]
    best = min(eligible, key=order, default=None)
    if best is not None and scores[best] > 0:
        return best, Verdict(improved=True, checkpoint=best,
                             message=f"{best} is better than the base: {_gains_text(gains[best], ckpts[best])}, "
                                     f"J {scores[best]:+.4g}")
    closest = min(gains, key=order)
    held = _held_back(gains[closest], scores[closest], failing.get(closest, ()))
    return BASE, Verdict(improved=False, checkpoint=closest,
                         message=f"no checkpoint is better than the base, so the base is the choice; closest "
                                 f"{closest}: {_gains_text(gains[closest], ckpts[closest])}, "
                                 f"J {scores[closest]:+.4g}; held back by {held}")


def _gains_text(gains: Mapping[str, float], ckpt: CheckpointEvals) -> str:
    """The domain gain with its rate per training token, then the other axes."""
    parts = []
    if "domain" in gains:
        rate = f" ({gains['domain'] / ckpt.tokens:+.3g} per token)" if ckpt.tokens else ""
        parts.append(f"domain {gains['domain']:+.2%} over the base after {ckpt.tokens:,} tokens{rate}")
    else:
        parts.append("no domain suite")
    parts += [f"{axis} {gains[axis]:+.2%}" for axis in SCORE_AXES[1:] if axis in gains]
    return ", ".join(parts)


def _held_back(gains: Mapping[str, float], j: float, failing: Sequence[str]) -> str:
    """What keeps a checkpoint from being chosen, most decisive first."""
    why = []
    if failing:
        why.append("gate " + ", ".join(failing))
    if gains.get("domain", 0.0) <= 0:
        why.append("the domain, which did not improve")
    worse = [axis for axis in SCORE_AXES[1:] if gains.get(axis, 0.0) < 0]
    if worse:
        why.append("regressions on " + ", ".join(worse))
    if not why or j <= 0:
        why.append(f"J {j:+.4g}, not above the base's 0")
    return "; ".join(why)
