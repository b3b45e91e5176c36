"""When a timer pass may decide from what an earlier read saw, instead of reading it again.

With hundreds of runs reconciled every few seconds, reading everything afresh for every run on
every pass costs more CPU than the operator's one core has. Most passes find nothing new, so a
timer pass reads cheaply:

* Jobs and pods come from kopf indices fed by watches (`handlers.run_jobs`, `run_pods`), and
  Prometheus is read once per namespace and short interval (`Shared`), one query per series shape
  for all runs, split by run. Only the operator's identity reads these, so sharing them across
  runs shows a run nothing it could not see anyway.
* A run's storage (checkpoints, evaluation records, skip windows) is read again only when it can
  have changed (`storage_due`): the attempt is not running undisturbed, its metrics report a
  checkpoint or evaluation newer than storage showed, its anomaly count moved, or the last read
  is older than a maximum age. It is read with the run's own credentials, so what was read is
  kept per run and per identity, never served under another.

And a pass that would do anything (`acts`) decides again from a fresh read of everything, so no
action is ever taken on cached observations; cached ones only keep the steady passes cheap.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, TypeVar

from ..policy.types import EvalPoint
from ..reconcile import Emit, Pin, Plan
from ..records import Records
from cpt_api.store import CheckpointRef

T = TypeVar("T")


class Shared(Generic[T]):
    """One value per key (a namespace), loaded at most once per `ttl_s` for every caller. While
    one caller loads a new value the others take the last one rather than wait (only the first
    load is waited for). A failed load is kept like a value: with a server down, hundreds of
    passes would otherwise each wait for their own timeout."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._entries: dict[Hashable, tuple[float, T | None, Exception | None]] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> tuple[T, float]:
        """The value and when it was loaded (this clock); raises what the load raised."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        entry = self._entries.get(key)
        if entry is None or self.clock() - entry[0] >= self.ttl_s:
            if lock.acquire(blocking=entry is None):
                try:
                    entry = self._entries.get(key)
                    if entry is None or self.clock() - entry[0] >= self.ttl_s:  # not loaded meanwhile
                        entry = self._load(key, load)
                finally:
                    lock.release()
        assert entry is not None
        at, value, error = entry
        if error is not None:
            raise error
        return value, at  # type: ignore[return-value]

    def _load(self, key: Hashable, load: Callable[[], T]) -> tuple[float, T | None, Exception | None]:
        at = self.clock()
        try:
            entry: tuple[float, T | None, Exception | None] = (at, load(), None)
        except Exception as exc:  # noqa: BLE001 (kept and re-raised to every caller)
            entry = (at, None, exc)
        self._entries[key] = entry
        return entry

    def forget(self, key: Hashable) -> None:
        with self._guard:
            self._entries.pop(key, None)


@dataclass(frozen=True, kw_only=True)
class Signals:
    """What a pass knows, without reading storage, about what storage may hold."""

    identity: Hashable
    """(checkpoint root, credentials) the storage is read with."""
    attempt: int
    steady: bool
    """The run's attempt is running and nothing else of the run is going on."""
    checkpoint_step: int | None = None
    """The newest checkpoint the attempt's metrics report (cpt_last_checkpoint_step)."""
    eval_step: int | None = None
    """The newest evaluation of the attempt its metrics report."""
    anomalies: int = 0


@dataclass(frozen=True, kw_only=True)
class StorageView:
    """A run's storage as one read saw it."""

    identity: Hashable
    attempt: int
    stale_at: float
    """When a read is due whatever the signals say (`stale_at`)."""
    refs: list[CheckpointRef]
    records: Records
    anomalies: int = 0

    def newest_checkpoint(self) -> int | None:
        return max((r.manifest.step for r in self.refs if r.attempt == self.attempt), default=None)

    def newest_eval(self) -> int | None:
        steps = [p.step for p in self.records.points if p.attempt == self.attempt]
        steps += [r.manifest.step for r in self.refs if r.attempt == self.attempt and r.manifest.evals]
        return max(steps, default=None)


def stale_at(now: float, max_age_s: float, draw: float) -> float:
    """When a read made `now` is too old: between half the maximum age and all of it, by `draw`
    in [0, 1). Runs created together would otherwise read their storage all at once, every
    maximum age, and the passes of that moment queue behind hundreds of requests."""
    return now + max_age_s * (0.5 + 0.5 * draw)


def storage_due(view: StorageView | None, signals: Signals, now: float) -> bool:
    """Whether a pass must read the run's storage again rather than use `view`."""
    if view is None or not signals.steady or view.identity != signals.identity or view.attempt != signals.attempt:
        return True
    if now >= view.stale_at or signals.anomalies != view.anomalies:
        return True
    return _behind(view.newest_checkpoint(), signals.checkpoint_step) or _behind(view.newest_eval(),
                                                                                 signals.eval_step)


def _behind(stored: int | None, reported: int | None) -> bool:
    return reported is not None and reported > 0 and (stored is None or stored < reported)


def newest_eval(points: Iterable[EvalPoint], attempt: int) -> int | None:
    return max((p.step for p in points if p.attempt == attempt), default=None)


def acts(plan: Plan, phase_before: str, pinned: Pin | None) -> bool:
    """The plan does more than restate what is: a new phase, an attempt started, stopped or
    swept, or pins other than those already written. Events alone do not count: they only
    report what the observations say (a policy warning repeats on every pass that sees it)."""
    return plan.status.phase.value != phase_before or any(
        a != pinned if isinstance(a, Pin) else not isinstance(a, Emit) for a in plan.actions)
