"""Where the next attempt starts from, and what it changes.

Targets:
* `base` — the immutable base model.
* `lastGood` — the newest checkpoint (by attempt, then step) whose own evaluation passed every
  gate against its baseline and whose manifest is marked stable; the base when there is none.
  Hysteresis does not apply here: a checkpoint inside a run of breaches that had not fired yet
  is still not good.
* tune — no rewind: the newest checkpoint of the run (or the base), with adjusted overrides.

Adjustments (the debug order of a falling general score starts with LR, then replay):
`lr_scale ← lr_scale · lrFactor` and `replay_delta ← replay_delta + replayDelta`, the latter
capped so that the replay share of the mixture (the spec's replay weight share plus the
delta) never exceeds 0.9: a mixture with no domain data is no longer continued pretraining.
Skipped data windows are kept whatever else changes: bad data stays bad.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from cpt_api.evaluation import TuneSpec
from cpt_api.spec import CptRunSpec, SourceRole
from cpt_api.status import Overrides
from .gates import passes_all
from .types import BASE, EvalPoint, ordered

MAX_REPLAY_SHARE = 0.9


def last_good(spec: CptRunSpec, base: Mapping[str, float], points: Sequence[EvalPoint]) -> str:
    """The newest stable checkpoint that passed every gate, else `base`."""
    history = ordered(points)
    for index in reversed(range(len(history))):
        point = history[index]
        if point.checkpoint and point.stable and passes_all(spec, base, history, index):
            return point.checkpoint
    return BASE


def newest_checkpoint(points: Sequence[EvalPoint]) -> str:
    named = [p.checkpoint for p in ordered(points) if p.checkpoint]
    return named[-1] if named else BASE


def replay_share(spec: CptRunSpec) -> float:
    """Share of the spec's (static) source weights that is general replay."""
    total = sum(s.weight for s in spec.data.sources)
    replay = sum(s.weight for s in spec.data.sources if s.role == SourceRole.replay)
    return replay / total if total else 0.0


def adjust(spec: CptRunSpec, current: Overrides, tunes: Sequence[TuneSpec]) -> tuple[Overrides, list[str]]:
    """New overrides after the given gates fired; the strongest adjustment of each kind wins,
    so two gates firing together do not halve the LR twice."""
    if not tunes:
        return current, []
    lr_factor = min(t.lr_factor for t in tunes)
    wanted = current.replay_delta + max(t.replay_delta for t in tunes)
    share = replay_share(spec)
    warnings: list[str] = []
    if share == 0.0 and wanted > current.replay_delta:
        warnings.append("no replay source in the mixture; the replay adjustment is not applied")
        wanted = current.replay_delta
    capped = max(current.replay_delta, min(wanted, MAX_REPLAY_SHARE - share))
    if capped < wanted:
        warnings.append(f"replay share capped at {MAX_REPLAY_SHARE:.0%}")
    return current.model_copy(update={"lr_scale": current.lr_scale * lr_factor,
                                      "replay_delta": capped}), warnings
