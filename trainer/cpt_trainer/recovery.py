"""Anomaly recovery: what a run of anomalous steps costs, and which data is blamed for it.

`anomaly.py` flags steps (the step's update is skipped); this module decides the rest. After
`maxConsecutive` in a row the attempt restores the weights and optimizer of its last stable
checkpoint but keeps its data position, so the data of the anomalous steps is skipped, and
records that stretch of the blamed source as a skip window (`api.skips`: an event, a file the
control plane reads, and every later checkpoint's lineage, so a rollback to an earlier
checkpoint skips it too). Anomalous steps blamed on a source that continue a known window
(begun inside it or at its end, its own or one the control plane said to skip) widen it
without another restore, however few they are: the weights are still the stable ones, and one
bad stretch of data is at most one restore, however long.

Every rank runs this: whether to restore is decided on rank 0's data positions (a broadcast),
and the restore itself is collective.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cpt_api import store
from cpt_api.events import Anomaly, Finished
from cpt_api.exit_codes import EXIT_ANOMALY
from cpt_api.manifest import SKIPS
from cpt_api.skips import SKIP_LIST, DataSkip, merge_skips
from cpt_api.spec import AnomalySpec, NonFiniteAction, RestoreMode

from . import checkpoint, distributed
from .anomaly import AnomalyDetector, Verdict
from .checkpoint_manager import CheckpointManager
from .events import EventLog, finite
from .goodput import TimeAccount

log = logging.getLogger(__name__)


@dataclass
class Streak:
    """The current run of anomalous steps."""

    consumed: dict[str, int] = field(default_factory=dict)
    """Per source, tokens consumed before it began."""
    step: int = 0
    blamed: list[str] = field(default_factory=list)
    """The source each of its steps was blamed on (steps nobody was blamed for are left out)."""


class Recovery:
    def __init__(self, spec: AnomalySpec, anomaly: AnomalyDetector, ckpt: CheckpointManager, *,
                 data: Any, told: list[DataSkip], checkpoint_uri: str, attempt: int, is_main: bool,
                 base_uri: str, events: EventLog, metrics: Any, clock: TimeAccount):
        self.spec, self.anomaly, self.ckpt, self.data = spec, anomaly, ckpt, data
        self.told = told
        """Windows the control plane said to skip (the overrides)."""
        self.checkpoint_uri, self.attempt, self.is_main = checkpoint_uri, attempt, is_main
        self.base_uri = base_uri
        self.events, self.metrics, self.clock = events, metrics, clock
        self.skips: list[DataSkip] = []
        """Data windows this attempt blamed for its restores (api.skips)."""
        self.unstable = False
        """An anomaly since the last checkpoint: the next one is not stable."""
        self.streak = Streak()

    def lineage_skips(self) -> list[DataSkip]:
        """Every window a checkpoint's lineage carries: those it was told and its own."""
        return merge_skips(self.told, self.skips)

    def on_anomaly(self, verdict: Verdict, consumed: dict[str, int], step: int, tokens: int) -> int | None:
        """Step `step` was flagged (its update skipped); `consumed` is the data position before
        it. Returns an exit code when the attempt must end."""
        if self.anomaly.consecutive == 1:
            self.streak = Streak(consumed, step, [])
        self.unstable = True
        self.metrics.anomaly(verdict.kind)
        if verdict.source is not None:
            self.streak.blamed.append(verdict.source)
        self.events.emit(Anomaly, step=step, kind=verdict.kind, value=finite(verdict.value),
                         threshold=verdict.threshold, message=verdict.message, source=verdict.source)
        log.warning("step %d skipped: %s%s", step, verdict.message,
                    f" (source {verdict.source})" if verdict.source else "")
        action = self.spec.on_non_finite
        if verdict.kind == "non_finite" and action == NonFiniteAction.stop:
            self.events.emit(Finished, step=step, tokens=tokens, reason="anomaly", message=verdict.message)
            return EXIT_ANOMALY
        # Rank 0's data positions on every rank: whether to restore is a collective decision.
        window = distributed.broadcast_object(self._skip_window())
        assert window is None or isinstance(window, DataSkip)
        known = self._touching(window)
        if known is not None:
            assert window is not None  # _touching returns None when window is None
            self._widen(known, window, step)
        elif self.anomaly.needs_restore or (verdict.kind == "non_finite" and action == NonFiniteAction.rollback):
            self._recover(window, step)
        return None

    def _touching(self, window: DataSkip | None) -> DataSkip | None:
        """The known window (this attempt's or one it was told to skip) that the current run of
        anomalous steps continues: same source, begun inside or right at its end."""
        if window is None:
            return None
        for known in reversed([*self.skips, *self.told]):
            if known.source == window.source and known.start <= window.start <= known.end:
                return known
        return None

    def _widen(self, known: DataSkip, window: DataSkip, step: int) -> None:
        """The bad stretch goes on: skip it without another restore (its steps were skipped,
        the weights are still the stable ones)."""
        self.anomaly.consecutive = 0
        if window.end <= known.end:
            return
        wider = known.model_copy(update={"end": window.end})
        self._record_skips(merge_skips(self.skips, [wider]))
        self.metrics.anomaly("skipped")
        self.events.emit(Anomaly, step=step, kind="skipped", source=wider.source, skip=wider,
                         message=f"anomalies go on in source {wider.source}: its skipped window "
                                 f"grows to tokens {wider.start}-{wider.end}")

    def _recover(self, window: DataSkip | None, step: int) -> None:
        """Restore the last stable checkpoint; the data moves on, past the blamed window."""
        self.anomaly.consecutive = 0
        with self.clock.timed("anomalies"):
            origin = self._restore_stable()
        if window is not None:
            self._record_skips(merge_skips(self.skips, [window]))
        blame = (f"; source {window.source} is blamed, its tokens {window.start}-{window.end} "
                 f"are skipped" if window else "")
        self.metrics.anomaly("restored")
        self.events.emit(Anomaly, step=step, kind="restored",
                         source=window.source if window else None, skip=window,
                         message=f"restored weights and optimizer from {origin} after "
                                 f"{self.spec.max_consecutive} anomalous steps{blame}")

    def _restore_stable(self) -> str:
        """Weights and optimizer of the last stable checkpoint of this attempt (or of its start
        point); the data stream moves on, past the slice that hurt. Returns where they came from."""
        self.ckpt.wait()
        # sizes only: the restore verifies every block it reads
        found = distributed.broadcast_object(
            checkpoint.latest_valid(self.checkpoint_uri, stable_only=True, deep=False) if self.is_main else None)
        own = checkpoint.join(self.checkpoint_uri, found[0]) if found else None  # type: ignore[index]
        start = self.ckpt.start
        uri = own or start.uri
        # Optimizer moments belong to the weights they were taken with: keep them only when the
        # source carries them for this run (our own checkpoint, or a fullState start).
        with_state = uri is not None and (own is not None or start.mode == RestoreMode.full_state)
        self.ckpt.load_weights(uri, with_state=with_state)
        return uri or f"base {self.base_uri}"

    def _record_skips(self, skips: list[DataSkip]) -> None:
        """The attempt's windows, kept and written where the control plane reads them (the
        operator cannot read this attempt's events)."""
        self.skips = skips
        if self.is_main:
            store.put_atomic(self.checkpoint_uri, SKIPS, SKIP_LIST.dump_json(skips, by_alias=True))

    def _skip_window(self) -> DataSkip | None:
        """The stretch of the most blamed source read by the current run of anomalous steps."""
        if not self.streak.blamed:
            return None
        source = Counter(self.streak.blamed).most_common(1)[0][0]
        start = self.streak.consumed.get(source, 0)
        end = self.data.consumed_tokens()[source]
        if end <= start:
            return None
        return DataSkip(source=source, start=start, end=end, attempt=self.attempt, step=self.streak.step)


__all__ = ["Recovery", "Streak"]
