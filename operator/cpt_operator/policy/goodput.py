"""A run's wall time by cause (`api.goodput`), from its attempts' times and their trainers'
reports. Pure: the reconcile core calls `begin` as the first attempt starts, `close` as each
attempt ends and `refresh` at the end of every pass (the ended attempts plus the current one's
live figures, kept in status.goodput).

Per attempt, from its creation to its end (or now):
  starting      creation -> the trainer's first process (times.began)
  the trainer's own parts (restoring, evaluating, checkpointing, anomalies, and the in-place
  restarts' lostSteps and failures), as it measured them
  its steps     productive, except what the attempt's end takes from them:
                a failure loses the steps after the last committed checkpoint (lostSteps),
                a rollback the steps after its target (rollbacks; all of them when the target is
                another attempt's checkpoint or the base)
  the tail      the trainer's last report -> the end: failures, rollbacks or other
  other         what the trainer's report leaves uncovered between its start and its last report
So the causes of an attempt sum to its wall time, and `other` says how much of it no measurement
explains.
"""
from __future__ import annotations

from typing import Literal, Mapping

from cpt_api.goodput import CAUSES, Cause, Goodput, TrainerTimes
from cpt_api.status import TERMINAL_PHASES, CptRunStatus
from .start import instant

REFRESH_S = 30.0
"""How stale the live figures of a running attempt may get: they change with the clock, and a
status write every pass would cost the API server more than they are worth."""

Ending = Literal["running", "finished", "failed", "rollback"]
"""How an attempt ended: `finished` (its budget, a stop) keeps every step."""


def attempt_seconds(created: float, end: float, times: TrainerTimes | None, ending: Ending,
                    kept_step: int | None = None) -> dict[str, float]:
    """One attempt's seconds by cause. `kept_step`: for a rollback to a checkpoint of this same
    attempt, its step (the steps up to it stay productive)."""
    out = {c.value: 0.0 for c in CAUSES}
    wall = max(0.0, end - created)
    if times is None:  # no trainer ever reported: the attempt never got past its start
        out[Cause.starting.value] = wall
        return out
    out[Cause.starting.value] = min(wall, max(0.0, times.began - created))
    measured = {Cause.restoring: times.restoring, Cause.evaluating: times.evaluating,
                Cause.checkpointing: times.checkpointing, Cause.anomalies: times.anomalies,
                Cause.lost_steps: times.lost_steps, Cause.failures: times.failures}
    for cause, seconds in measured.items():
        out[cause.value] = max(0.0, seconds)
    steps = max(0.0, times.steps)
    tail = max(0.0, end - max(times.reported, times.began))
    covered = sum(out.values()) - out[Cause.starting.value] + steps
    out[Cause.other.value] = max(0.0, (times.reported - times.began) - covered)
    if ending == "failed":
        kept = min(steps, max(0.0, times.committed))
        out[Cause.lost_steps.value] += steps - kept
        out[Cause.failures.value] += tail
    elif ending == "rollback":
        kept = _kept(times, kept_step, steps)
        out[Cause.rollbacks.value] += steps - kept + tail
    else:
        kept = steps
        out[Cause.other.value] += tail
    out[Cause.productive.value] = kept
    return out


def _kept(times: TrainerTimes, kept_step: int | None, steps: float) -> float:
    """The share of an attempt's step time a rollback to `kept_step` keeps (steps are taken as
    equally long: the trainer reports their sum, not each)."""
    done = times.step - times.first_step
    if kept_step is None or done <= 0:
        return 0.0
    return steps * min(1.0, max(0.0, (kept_step - times.first_step) / done))


def add(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: round(a.get(k, 0.0) + b.get(k, 0.0), 3) for k in {*a, *b}}


def account(goodput: Goodput, now: float, current: Mapping[str, float] | None) -> Goodput:
    """`goodput` with `seconds`, `until` and `share` as of `now`: the ended attempts plus the
    current one's live figures (None once the run has ended)."""
    seconds = add(goodput.ended, current or {})
    total = sum(seconds.values())
    share = seconds.get(Cause.productive.value, 0.0) / total if total > 0 else None
    return goodput.model_copy(update={"seconds": seconds, "until": now, "share": share})


def unix(rfc3339: str | None) -> float | None:
    """A time of status as Unix seconds (None for one that is not RFC 3339: some tests' clocks)."""
    try:
        return instant(rfc3339).timestamp() if rfc3339 else None
    except ValueError:
        return None


def newest(status: CptRunStatus, seen: TrainerTimes | None) -> TrainerTimes | None:
    """The current attempt's newest trainer report: `seen` this pass, else the one kept."""
    kept = status.goodput.last
    if seen is None or (kept is not None and kept.reported > seen.reported):
        return kept
    return seen


def _current(status: CptRunStatus, now: float, seen: TrainerTimes | None, ending: Ending,
             kept_step: int | None = None) -> dict[str, float]:
    created = unix(status.attempt_started_at) or now
    return attempt_seconds(created, now, newest(status, seen), ending, kept_step)


def begin(status: CptRunStatus, now: str) -> None:
    if status.goodput.since is None:
        status.goodput.since = unix(now)


def close(status: CptRunStatus, now: str, seen: TrainerTimes | None, ending: Ending,
          kept_step: int | None = None) -> None:
    """Fold the current attempt into `goodput.ended`, once (a stopped run resumed is not folded
    twice)."""
    at = unix(now)
    g = status.goodput
    if status.attempt == 0 or g.attempts >= status.attempt or at is None:
        return
    times = newest(status, seen)
    status.goodput = g.model_copy(update={
        "ended": add(g.ended, _current(status, at, seen, ending, kept_step)), "attempts": status.attempt,
        "last": None, "restarts": g.restarts + (times.restarts if times else 0)})


def refresh(status: CptRunStatus, before: CptRunStatus, now: str, seen: TrainerTimes | None) -> None:
    """The live account at the end of a pass: frozen once the run ended, and left as it was
    when only the clock moved since a recent refresh."""
    at, g = unix(now), status.goodput
    if g.since is None or at is None:
        return
    live = status.attempt > g.attempts and status.phase not in TERMINAL_PHASES
    if not live and g.until is not None and g.seconds == add(g.ended, {}):
        return  # the run ended earlier: its account stays as it was then
    times = newest(status, seen) if live else None
    restarts = g.restarts + (times.restarts if times else 0)
    same = (status.attempt, status.phase, restarts) == (before.attempt, before.phase, before.in_place_restarts)
    if live and same and g.until is not None and at - g.until < REFRESH_S:
        return
    status.goodput = account(g, at, _current(status, at, seen, "running") if live else None)
    status.goodput.last = times
    status.in_place_restarts = restarts
