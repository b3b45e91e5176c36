"""The mixture: which source the next training window comes from. Pure logic, no I/O.

Weights, in the order they are applied:
1. base weight per source: `weight`, or for strategy `curriculum` the source's `schedule`
   evaluated piecewise-linearly at the run's training-token position (held flat before the
   first and after the last point);
2. strategy `adaptive`: each source's base weight times a boost in [1, adaptiveMaxBoost].
   A source's progress is r = recent loss / first-seen loss (recent = exponential moving
   average of reported losses); the source that improved most has boost 1, any other gets
   r / r_min, capped. Sources that learn slowly relative to their start get sampled more;
3. normalise to shares;
4. control-plane override `replay_delta`: the replay role's total share grows by delta (capped
   at 1), replay sources keep their ratios among themselves, the others shrink proportionally.

Sampling: one draw per window. Draw k of rank r is u_k = H(seed, r, k) / 2^64 with H a
cryptographic hash, so the sequence depends only on (seed, rank, k): the sampler's whole
position is the integer k, and a resumed run continues it exactly, even with new weights.
Each window goes to the source whose cumulative share interval contains u_k.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

EMA_DECAY = 0.9
"""Weight of the old value in the recent-loss average (about the last ten reports count)."""


@dataclass(frozen=True)
class SourceWeights:
    """What the mixture needs to know about one source."""

    name: str
    role: str
    weight: float
    schedule: tuple[tuple[int, float], ...] = ()
    """(tokens, weight) points, strictly increasing in tokens; empty for a fixed weight."""


def schedule_weight(points: Sequence[tuple[int, float]], tokens: int) -> float:
    """Piecewise-linear interpolation, flat outside the points."""
    if tokens <= points[0][0]:
        return points[0][1]
    if tokens >= points[-1][0]:
        return points[-1][1]
    i = bisect.bisect_right([p[0] for p in points], tokens)
    (t0, w0), (t1, w1) = points[i - 1], points[i]
    return w0 + (w1 - w0) * (tokens - t0) / (t1 - t0)


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total}; at least one source needs weight > 0")
    return {name: w / total for name, w in weights.items()}


def shift_replay(shares: Mapping[str, float], roles: Mapping[str, str],
                 delta: float) -> dict[str, float]:
    """Add `delta` to the replay role's total share, renormalising everything else."""
    replay = sum(s for n, s in shares.items() if roles[n] == "replay")
    if delta == 0 or replay == 0:
        return dict(shares)
    target = min(1.0, max(0.0, replay + delta))
    rest = 1.0 - replay
    out = {}
    for name, share in shares.items():
        if roles[name] == "replay":
            out[name] = share * target / replay
        else:
            out[name] = share * (1.0 - target) / rest if rest > 0 else 0.0
    return out


def uniform(seed: int, rank: int, k: int) -> float:
    """The k-th draw of a rank, in [0, 1): a counter-based generator (no hidden state)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def pick(shares: Mapping[str, float], u: float) -> str:
    """The source whose cumulative-share interval holds u (zero-share sources never win)."""
    cumulative = 0.0
    last = None
    for name, share in shares.items():
        if share <= 0:
            continue
        cumulative += share
        last = name
        if u < cumulative:
            return name
    if last is None:
        raise ValueError("every source has share 0")
    return last  # u within float rounding of 1.0


@dataclass
class AdaptiveState:
    first: dict[str, float] = field(default_factory=dict)
    recent: dict[str, float] = field(default_factory=dict)

    def observe(self, losses: Mapping[str, float]) -> None:
        for name, loss in losses.items():
            if not math.isfinite(loss) or loss <= 0:
                continue  # a NaN step must not steer the mixture
            self.first.setdefault(name, loss)
            old = self.recent.get(name)
            self.recent[name] = loss if old is None else EMA_DECAY * old + (1 - EMA_DECAY) * loss

    def boosts(self, names: Sequence[str], max_boost: float) -> dict[str, float]:
        progress = {n: self.recent[n] / self.first[n] for n in names if n in self.recent}
        if not progress:
            return {n: 1.0 for n in names}
        best = min(progress.values())
        return {n: min(max_boost, max(1.0, progress[n] / best)) if n in progress else 1.0
                for n in names}


class Mixture:
    """Current shares and the deterministic draw sequence of one rank."""

    def __init__(self, sources: Sequence[SourceWeights], *, strategy: str, seed: int, rank: int,
                 max_boost: float = 1.0, replay_delta: float = 0.0):
        self.sources = list(sources)
        self.strategy, self.seed, self.rank = strategy, seed, rank
        self.max_boost, self.replay_delta = max_boost, replay_delta
        self.draws = 0
        self.adaptive = AdaptiveState()
        self._roles = {s.name: s.role for s in self.sources}

    def shares(self, tokens: int) -> dict[str, float]:
        """Normalised weights at a training-token position, after strategy and overrides."""
        base = {s.name: self._base(s, tokens) for s in self.sources}
        if self.strategy == "adaptive":
            boost = self.adaptive.boosts(list(base), self.max_boost)
            base = {n: w * boost[n] for n, w in base.items()}
        return shift_replay(normalise(base), self._roles, self.replay_delta)

    def _base(self, source: SourceWeights, tokens: int) -> float:
        if self.strategy == "curriculum" and source.schedule:
            return schedule_weight(source.schedule, tokens)
        return source.weight

    def next_source(self, tokens: int) -> str:
        u = uniform(self.seed, self.rank, self.draws)
        self.draws += 1
        return pick(self.shares(tokens), u)

    def report_losses(self, losses: Mapping[str, float]) -> None:
        self.adaptive.observe({n: v for n, v in losses.items() if n in self._roles})

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "first_loss": dict(self.adaptive.first),
                "recent_loss": dict(self.adaptive.recent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.adaptive = AdaptiveState(dict(state["first_loss"]), dict(state["recent_loss"]))
