"""The policy's inputs and outputs: plain frozen values, so a decision is a pure function of them.

Sequences are stored as tuples and mappings are read only, which keeps two calls with the same
observations from influencing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

from cpt_api.skips import DataSkip
from cpt_api.status import BASE as BASE, Overrides, Phase, RollbackRecord


@dataclass(frozen=True, kw_only=True)
class EvalPoint:
    """One evaluation of the model being trained (an `Evaluated` event, or a manifest's evals)."""

    attempt: int
    step: int
    tokens: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    """`suite.metric` -> value."""
    checkpoint: str | None = None
    """The checkpoint saved at this step, if any: only such points can be rollback targets."""
    stable: bool = True
    """The manifest's `stable` flag: False if anomalies were seen before this checkpoint."""


@dataclass(frozen=True, kw_only=True)
class Observations:
    """Everything `decide` looks at. Points may come in any order; the policy sorts them."""

    attempt: int
    """The attempt running now (1-based); gates count breaches within it only."""
    base: Mapping[str, float]
    """Reference evaluation of the base model before any training."""
    points: Sequence[EvalPoint] = ()
    """Evaluations of this attempt and of earlier ones."""
    anomalies: Mapping[str, int] = field(default_factory=dict)
    """Anomaly events of the current attempt by kind (grad_norm, loss_spike, non_finite,
    restored)."""
    rollbacks: int = 0
    """Rollback and tune restarts so far in this run."""
    overrides: Overrides = field(default_factory=Overrides)
    """Overrides the current attempt runs with."""
    budget_reached: bool = False
    """The trainer finished its token / step budget."""
    skips: Sequence[DataSkip] = ()
    """Data windows the current attempt's trainer blamed for its restores (newest extent)."""
    start: str = BASE
    """The checkpoint the current attempt started from, or `base`."""
    checkpoints: Sequence[CheckpointEvals] = ()
    """Usable checkpoints of the run, evaluated or not (anomaly rollback targets)."""


class Action(str, Enum):
    cont = "continue"
    rollback = "rollback"
    tune = "tune"
    stop = "stop"
    finish = "finish"


@dataclass(frozen=True, kw_only=True)
class GateOutcome:
    """One gate judged on the latest evaluation of the current attempt that carries its metric."""

    gate: str
    metric: str
    value: float
    baseline: float
    regression: float
    """How much worse than the baseline (fraction if relative, else metric units)."""
    threshold: float
    relative: bool
    streak: int
    """Breaching evaluations in a row, newest last."""
    consecutive: int
    step: int

    @property
    def breached(self) -> bool:
        return self.streak > 0

    @property
    def fired(self) -> bool:
        return self.streak >= self.consecutive

    def describe(self) -> str:
        unit = f"{self.regression:+.2%}" if self.relative else f"{self.regression:+.4g}"
        limit = f"{self.threshold:.2%}" if self.relative else f"{self.threshold:.4g}"
        return (f"gate {self.gate}: {self.metric}={self.value:.4g} vs baseline "
                f"{self.baseline:.4g} ({unit} worse, limit {limit}) at step {self.step}, "
                f"{self.streak}/{self.consecutive} in a row")


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Action
    reasons: tuple[str, ...] = ()
    breached: tuple[GateOutcome, ...] = ()
    """Gates breached on the latest evaluation (fired or still within their hysteresis)."""
    target: str | None = None
    """rollback / tune: `base` or the checkpoint name the next attempt restores from."""
    overrides: Overrides = field(default_factory=Overrides)
    """Overrides for the next attempt (the current ones unless rollback / tune)."""
    records: tuple[RollbackRecord, ...] = ()
    """One per gate or anomaly rule that caused a rollback / tune / stop (time left empty)."""
    warnings: tuple[str, ...] = ()
    phase: Phase | None = None
    """Terminal phase for stop (Failed or Stopped) and finish (Succeeded)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointEvals:
    """A checkpoint with the evaluation stored in its manifest."""

    name: str
    step: int
    tokens: int = 0
    evals: Mapping[str, float] = field(default_factory=dict)
    attempt: int = 1
    stable: bool = True
    """The manifest's `stable` flag."""
    evaluated: bool = True
    """An evaluation record names it (what a separate evaluation waits for)."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    frontier: tuple[str, ...]
    """Pareto-optimal checkpoints over (domain gain, general, safety), by step."""
    scores: Mapping[str, float]
    """J(t) of every checkpoint that has all the metrics the axes need."""
    gains: Mapping[str, Mapping[str, float]]
    """Checkpoint -> axis (domain, general, behavior, safety) -> normalised gain over the base."""
    passed: Mapping[str, bool]
    """Checkpoint -> passed every gate against its baseline."""
    chosen: str | None
    """The checkpoint to hand out, `base` when none is better than the base, None when nothing
    has been judged yet."""
    verdict: Verdict | None = None
    """Against the base; None while nothing can be compared with it (no suites, no evaluation)."""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Did the run produce something better than the base, and why (or why not)."""

    improved: bool
    checkpoint: str
    """The chosen checkpoint, or (not improved) the closest one: the highest J of all."""
    message: str


def ordered(points: Sequence[EvalPoint]) -> list[EvalPoint]:
    """Points in the order they happened: by attempt, then step."""
    return sorted(points, key=lambda p: (p.attempt, p.step, p.tokens))
