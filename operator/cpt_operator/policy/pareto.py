"""Checkpoint selection: the Pareto frontier, then the product's preference on it.

Each checkpoint gets a normalised gain over the base per axis (`metrics.normalised_gain`;
several suites of one kind are averaged):

    g_domain, g_general, g_behavior, g_safety      (> 0: better than the base)

so `ΔM_d = g_domain` and `Reg_x = -g_x`. The gate score is

    J(t) = w_d·ΔM_d − w_g·Reg_general − w_b·Reg_behavior − w_s·Reg_safety
         = w_d·g_domain + w_g·g_general + w_b·g_behavior + w_s·g_safety

with the weights of `spec.selection`. Regressions are signed, so a checkpoint that *improves*
general text is preferred to one that merely holds it.

Frontier: over (g_domain, g_general, g_safety), all maximised. A checkpoint is on it when no
other is at least as good on every axis and strictly better on one; identical points are all
kept. Algorithm: sort by the axes lexicographically, best first; a point can only be dominated
by one sorted before it, and if it is dominated at all it is dominated by a frontier member
(dominance is transitive), so each point is checked against the frontier found so far:
O(n·|frontier|).

Choice: the highest J among frontier checkpoints that pass every gate; if none passes, the
highest J on the frontier (with a warning). Ties go to the earlier step, then the name, so the
choice is deterministic. Never simply the last, the domain-best or the lowest-loss one.

Axes whose metric the base evaluation lacks are left out (with a warning); a checkpoint that
lacks a metric an axis needs, or has a non-finite one, is left out of the frontier.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..api.evaluation import SuiteSpec
from ..api.spec import CptRunSpec
from .gates import passes_all
from ..api.metrics import metric_key, normalised_gain
from .types import CheckpointEvals, EvalPoint, Selection

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


def gate_passes(spec: CptRunSpec, base: Mapping[str, float],
                checkpoints: Sequence[CheckpointEvals]) -> dict[str, bool]:
    """Checkpoint -> passed every gate; `best` baselines use the checkpoints before it."""
    ordered_ckpts = sorted(checkpoints, key=lambda c: (c.attempt, c.step, c.name))
    history = [EvalPoint(attempt=c.attempt, step=c.step, tokens=c.tokens, metrics=c.evals,
                         checkpoint=c.name) for c in ordered_ckpts]
    return {c.name: passes_all(spec, base, history, i) for i, c in enumerate(ordered_ckpts)}


def select_checkpoint(spec: CptRunSpec, base: Mapping[str, float],
                      checkpoints: Sequence[CheckpointEvals]) -> Selection:
    """Frontier, scores and the chosen checkpoint (see the module docstring)."""
    axes, warnings = axis_suites(spec, base)
    gains: dict[str, dict[str, float]] = {}
    for ckpt in sorted(checkpoints, key=lambda c: (c.step, c.name)):
        result = gains_of(axes, base, ckpt.evals)
        if isinstance(result, str):
            warnings.append(f"checkpoint {ckpt.name} has no usable {result}; not ranked")
        else:
            gains[ckpt.name] = result
    names = list(gains)
    used = [a for a in FRONTIER_AXES if a in axes]
    frontier = [names[i] for i in pareto_front([[gains[n][a] for a in used] for n in names])]
    scores = {n: score(spec, gains[n]) for n in names}
    passed = gate_passes(spec, base, checkpoints)
    chosen, why = _choose(frontier, scores, passed, {c.name: c.step for c in checkpoints})
    if not axes and checkpoints:
        # Nothing measured: every checkpoint ties, and the newest holds the most training.
        newest = max(checkpoints, key=lambda c: (c.attempt, c.step, c.name))
        chosen, why = newest.name, ["no evaluation suites: choosing the newest checkpoint"]
    return Selection(frontier=tuple(frontier), scores=scores, gains=gains, passed=passed,
                     chosen=chosen, warnings=tuple(warnings + why))


def _choose(frontier: Sequence[str], scores: Mapping[str, float], passed: Mapping[str, bool],
            steps: Mapping[str, int]) -> tuple[str | None, list[str]]:
    candidates = [n for n in frontier if passed.get(n, False)]
    warnings: list[str] = []
    if not candidates and frontier:
        warnings.append("no frontier checkpoint passes every gate; choosing the best J on the "
                        "frontier anyway")
        candidates = list(frontier)
    if not candidates:
        return None, warnings
    best = min(candidates, key=lambda n: (-scores[n], steps[n], n))
    return best, warnings
