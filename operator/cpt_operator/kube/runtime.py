"""What the operator's handlers share (`Runtime`: clients, per-run caches, one lock per run) and
how it is built; the alert webhook's admission lands here, on the run's annotation."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

import kopf
from pydantic import ValidationError

from cpt_api.alerts import AlertRef, Verdict, decode_refs, encode_refs
from cpt_api.spec import CptRunSpec
from cpt_api.status import CptRunStatus
from ..policy.alerts import Admission, Alerted, admit
from ..policy.model_shape import ModelShape
from ..reconcile import Pin
from ..records import RunRecords
from cpt_api.store import CheckpointRef
from .backoff import Backoff
from .client import KubeClient, load_config
from .freshness import Shared, StorageView
from .launcher import IndexedJobLauncher, Launcher
from .metrics import OperatorMetrics
from .observe import PointCache
from .prometheus import NamespaceSeries, PrometheusReader
from .settings import ANNOTATION_ALERT, Settings


Emitter = Callable[[Mapping[str, Any], str, str, str], None]
"""(object body, type, reason, message): posts a Kubernetes event about the object."""


def kopf_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(as_body(body), type=type_, reason=reason, message=message[:1000])


@dataclass
class Runtime:
    """What the handlers share: clients, caches and one lock per run (a timer and a change
    handler of the same run must not interleave their passes)."""

    settings: Settings
    kube: KubeClient
    launcher: Launcher
    prometheus: PrometheusReader | None
    metrics: OperatorMetrics
    caches: dict[str, PointCache] = field(default_factory=dict)
    records: dict[str, RunRecords] = field(default_factory=dict)
    """Per run: its trainers' records read so far (each file is read once)."""
    pinned: dict[str, Pin] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int | None, str], ModelShape | str]] = field(default_factory=dict)
    """Per run: ((generation, base uri), the base's shape or why it could not be read)."""
    emit: Emitter = kopf_event
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    manifests: dict[str, dict[str, CheckpointRef]] = field(default_factory=dict)
    """Per run: the checkpoints whose manifests were read, by name."""
    storage: dict[str, StorageView] = field(default_factory=dict)
    """Per run: its storage as last read (timer passes decide from it while nothing changed)."""
    series: Shared[NamespaceSeries] = field(default_factory=lambda: Shared(2.0))
    """Per namespace: its runs' series in Prometheus, read once for the timer passes of all of them."""
    refused: dict[str, Backoff] = field(default_factory=dict)
    """Per run: starts the API server refused for now (Forbidden), and when to try again."""

    def lock(self, key: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(key, threading.Lock())

    def forget(self, uid: str, deleted: bool = False) -> None:
        """Drop what was kept for a run that finished or was deleted; a finished run that is
        resumed reads it all again. The pins last written stay until the run is deleted: a
        finished run's passes would otherwise write the same pinned.json every time."""
        dropped: list[dict[str, Any]] = [self.caches, self.shapes, self.manifests, self.records, self.storage,
                                      self.refused]
        for per_run in dropped + ([self.pinned] if deleted else []):
            per_run.pop(uid, None)

    def record_alert(self, alert: Alerted) -> Admission:
        from kubernetes.client.exceptions import ApiException

        judged: list[Admission] = []

        def change(body: Mapping[str, Any]) -> str | None:
            waiting = decode_refs((body["metadata"].get("annotations") or {}).get(ANNOTATION_ALERT))
            judged[:] = [_admit(alert, body, waiting)]
            ref = judged[0].ref
            return None if ref is None else encode_refs([*waiting, ref])

        try:
            self.kube.update_annotation(alert.namespace, alert.run, ANNOTATION_ALERT, change)
        except ApiException as exc:
            if exc.status == 404:
                return Admission(Verdict.no_such_run, detail=f"no CptRun {alert.namespace}/{alert.run}")
            raise
        return judged[0]


def _admit(alert: Alerted, body: Mapping[str, Any], waiting: list[AlertRef]) -> Admission:
    try:
        spec = CptRunSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return Admission(Verdict.not_running, detail="the run's spec is invalid")
    return admit(alert, spec, load_status(body.get("status") or {}), waiting)


def build_runtime(settings: Settings) -> Runtime:
    load_config()
    reader = PrometheusReader(settings.prometheus_url) if settings.prometheus_url else None
    return Runtime(settings=settings, kube=KubeClient(), launcher=IndexedJobLauncher(settings),
                   prometheus=reader, metrics=OperatorMetrics(), series=Shared(settings.shared_read_s))


# -- observing -------------------------------------------------------------------------------
def load_status(raw: Mapping[str, Any]) -> CptRunStatus:
    known = {f.alias or name for name, f in CptRunStatus.model_fields.items()}
    return CptRunStatus.model_validate({k: v for k, v in raw.items() if k in known})


def as_body(body: Mapping[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, dict(body)))
