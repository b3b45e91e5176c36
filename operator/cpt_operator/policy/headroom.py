"""Gate headroom: how far an evaluation is from each gate's limit, for people watching a run.

For a gate with threshold `τ` and a point's regression `r` against the gate's baseline (see
`gates.py`), the headroom is `τ − r`: positive while the point is within the gate, negative once
it breaches. It is in the gate's own units (a fraction of the baseline for a relative gate, the
metric's units otherwise), so `0.04` on a 10 % perplexity gate means "4 % of the base left".

The decision is still `gates.judge_gates` with its hysteresis; this only reports the distance.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cpt_api.spec import CptRunSpec
from cpt_api.metrics import metric_key, relative_undefined
from .gates import judge_point
from .types import EvalPoint


@dataclass(frozen=True)
class Headroom:
    gate: str
    metric: str
    value: float
    left: float
    """threshold − regression: > 0 within the gate, < 0 breached."""
    relative: bool
    """`left` is a fraction of the baseline (else in the metric's units)."""

    def text(self) -> str:
        if not math.isfinite(self.left):
            return f"{self.gate} breached"
        left = f"{self.left:+.1%}" if self.relative else f"{self.left:+.3g}"
        return f"{self.gate} {left}"


def headroom(spec: CptRunSpec, base: Mapping[str, float], history: Sequence[EvalPoint]
             ) -> list[Headroom]:
    """Each gate's headroom at the newest point of `history` that carries its metric; gates
    that cannot be judged yet (no base, no point) are left out."""
    suites = spec.suites_by_name()
    out = []
    for gate in spec.gates:
        suite = suites.get(gate.suite)
        if suite is None:
            continue
        key = metric_key(suite)
        index = next((i for i in range(len(history) - 1, -1, -1) if key in history[i].metrics), None)
        judged = None if index is None else judge_point(gate, suite, base, history, index)
        if judged is None or isinstance(judged, str):
            continue
        value, reference, reg = judged
        out.append(Headroom(gate.name, key, value, gate.threshold - reg,
                            gate.relative and not relative_undefined(reference)))
    return out
