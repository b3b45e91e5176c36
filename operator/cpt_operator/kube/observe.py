"""Turn what the cluster, Prometheus and the checkpoint store say into the core's `Observed`.

The trainers' records are the ground truth for which evaluations happened (Prometheus may have
scraped only some of them) and the checkpoint manifests for which checkpoint exists: an
evaluation seen in Prometheus is replaced by its record, and at the step of a checkpoint by the
manifest's, which also names the checkpoint (only such points can be rollback targets).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from cpt_api.alerts import AlertRef, decode_refs
from ..policy.evaluations import EvalRun
from ..policy.types import EvalPoint
from ..reconcile import AttemptState, Observed
from ..records import Records, checkpoint_evals, merge_points
from cpt_api.store import CheckpointRef
from .prometheus import TrainerSeries
from .settings import ANNOTATION_ALERT, ANNOTATION_RESUME, ANNOTATION_ROLLBACK, ANNOTATION_STOP


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, kw_only=True)
class Requests:
    """What people (annotations set by `cptctl`) and alerts (the webhook) ask of a run."""

    stop: bool = False
    rollback_to: str | None = None
    alerts: tuple[AlertRef, ...] = ()
    alert_annotation: bool = False
    """The alert annotation is set (even to something unreadable, which is cleared all the same)."""
    resume: bool = False

    @property
    def one_shot(self) -> list[str]:
        """Annotations to clear once acted on (a stop stays: it is a state, not an event)."""
        return [k for k, v in ((ANNOTATION_ROLLBACK, self.rollback_to), (ANNOTATION_ALERT, self.alert_annotation),
                               (ANNOTATION_RESUME, self.resume)) if v]


def requests(annotations: Mapping[str, str] | None) -> Requests:
    annotations = annotations or {}
    stop = _yes(annotations.get(ANNOTATION_STOP, ""))
    rollback = annotations.get(ANNOTATION_ROLLBACK, "").strip() or None
    raw = annotations.get(ANNOTATION_ALERT)
    return Requests(stop=stop, rollback_to=rollback, alerts=tuple(decode_refs(raw)), alert_annotation=bool(raw),
                    resume=_yes(annotations.get(ANNOTATION_RESUME, "")))


def _yes(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


@dataclass
class PointCache:
    """Evaluations already read for one run, so each pass asks Prometheus only for the recent
    window rather than the run's whole life."""

    OVERLAP_S = 60.0
    """Each read goes this far back before the last one: samples a scrape delivered late."""

    points: dict[tuple[int, int], EvalPoint] = field(default_factory=dict)
    read_at: float | None = None

    def window(self, created_at: float | None, now: float, overlap_s: float = OVERLAP_S) -> int:
        start = self.read_at - overlap_s if self.read_at else (created_at or now - 3600) - overlap_s
        return max(int(now - start), 1)

    def update(self, points: Iterable[EvalPoint], now: float) -> list[EvalPoint]:
        points = list(points)
        # the oldest evaluation of each attempt in a window may be cut off by the window's start
        # (and with it the samples that tell a torn scrape apart): what was read whole wins
        first = {p.attempt: p.step for p in sorted(points, key=lambda p: (p.attempt, -p.step))}
        for p in points:
            old = self.points.get((p.attempt, p.step))
            if old is not None and first[p.attempt] == p.step:
                continue
            metrics = {**(old.metrics if old else {}), **p.metrics}
            self.points[(p.attempt, p.step)] = replace(p, metrics=metrics)
        self.read_at = now
        return [self.points[k] for k in sorted(self.points)]


def observed(*, body: Mapping[str, Any], attempt: AttemptState, series: TrainerSeries | None,
             points: Sequence[EvalPoint], refs: Sequence[CheckpointRef],
             records: Records | None = None, pods_left: Sequence[int] = (),
             strays: Mapping[int, Sequence[str]] | None = None,
             evaluations: Mapping[str, EvalRun] | None = None) -> Observed:
    asks = requests(body.get("metadata", {}).get("annotations"))
    records = records or Records()
    if series is not None and attempt.state != "absent":
        attempt = replace(attempt, step=series.step or attempt.step, tokens=series.tokens or attempt.tokens,
                          times=series.times or attempt.times)
    base = records.base or (dict(series.base) if series else {})
    return Observed(attempt=attempt, now=now_rfc3339(), base=base, base_sha256=records.base_sha256,
                    points=merge_points(points, records.points, refs),
                    anomalies=dict(series.anomalies) if series else {},
                    skips=tuple(records.skips.get(attempt.number, ())),
                    checkpoints=checkpoint_evals(refs, records), stop_requested=asks.stop,
                    rollback_to=asks.rollback_to, alerts=asks.alerts, resume=asks.resume,
                    generation=body.get("metadata", {}).get("generation"), pods_left=tuple(pods_left),
                    strays=dict(strays or {}), evaluations=dict(evaluations or {}))
