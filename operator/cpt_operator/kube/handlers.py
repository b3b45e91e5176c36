"""kopf handlers: thin, over the pure reconcile core.

Every trigger (create, resume, change, a timer every few seconds) runs the same pass for one
CptRun: read it fresh -> observe (Job and pods, Prometheus, checkpoint manifests) -> `reconcile`
-> carry out the plan -> patch status. A timer pass observes cheaply first and decides again from
fresh reads before it acts (`kube.freshness`). The order of writes is what makes a crash at any point
safe: a new attempt's objects are created before the status that names it (a repeat finds and
adopts them), while a stop is recorded in status before the Job is deleted (a repeat issues the
stop again, see `reconcile`), so no decision is lost and nothing is created twice.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence, cast

import kopf
from pydantic import ValidationError

from ..api import kueue
from ..api.alerts import AlertRef, Verdict, decode_refs, encode_refs
from ..api.load import errors_from
from ..api.spec import GROUP, PLURAL, VERSION, CptRunSpec
from ..api.storage import RUN_CREDENTIALS, credentials_scope, is_object_store, summarise_error
from ..api.status import BASE, TERMINAL_PHASES, ConditionType, CptRunStatus, Phase, Reason
from ..base_shape import ShapeUnavailable, read_shape
from ..policy.admission import admission
from ..policy.alerts import Admission, Alerted, admit
from ..planning import refusal
from ..policy.memory_fix import checked, usages
from ..policy.model_shape import ModelShape
from ..policy.types import EvalPoint
from ..policy.tenancy import refusals
from ..policy.evaluations import EvalRun
from ..reconcile import (AttemptState, Emit, Evaluate, Pin, Plan, Release, StartAttempt, StopAttempt, StopEvaluations,
                         Sweep, reconcile, reconcile_unreadable, set_condition)
from ..records import Records, RunRecords, checkpoint_evals as obs_checkpoints
from ..store import CheckpointRef, list_checkpoints
from .attempts import Attempts, Children, group
from .builders import (LABEL_RUN, RunRef, SpecProblem, attempt_name, checkpoint_root, run_label,
                       selector, trainer_config)
from .checkpoints import foreign_owner, hold_start, prunes, starts, write_pins
from .backoff import Backoff
from .client import (WORKERS, Conflict, Forbidden, KubeClient, KueueMissing, NotOurs, Rejected, children_of,
                     load_config)
from .freshness import Shared, Signals, StorageView, acts, newest_eval, stale_at, storage_due
from .credentials import SecretUnreadable, use_run_credentials
from .evaluations import build as build_evaluation, evaluation_name, runs as evaluation_runs
from .launcher import IndexedJobLauncher, Launcher
from .metrics import OperatorMetrics
from .observe import PointCache, Requests, now_rfc3339, observed, parse_time, requests
from .prometheus import NamespaceSeries, PrometheusError, PrometheusReader, TrainerSeries
from .settings import ANNOTATION_ALERT, FINALIZER, Settings

SETTINGS = Settings.from_env()
log = logging.getLogger(__name__)
Emitter = Callable[[Mapping[str, Any], str, str, str], None]
"""(object body, type, reason, message): posts a Kubernetes event about the object."""


def kopf_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(_as_body(body), type=type_, reason=reason, message=message[:1000])


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
    return admit(alert, spec, _load_status(body.get("status") or {}), waiting)


def build_runtime(settings: Settings) -> Runtime:
    load_config()
    reader = PrometheusReader(settings.prometheus_url) if settings.prometheus_url else None
    return Runtime(settings=settings, kube=KubeClient(), launcher=IndexedJobLauncher(settings),
                   prometheus=reader, metrics=OperatorMetrics(), series=Shared(settings.shared_read_s))


# -- observing -------------------------------------------------------------------------------
def _load_status(raw: Mapping[str, Any]) -> CptRunStatus:
    known = {f.alias or name for name, f in CptRunStatus.model_fields.items()}
    return CptRunStatus.model_validate({k: v for k, v in raw.items() if k in known})


def _checkpoints(rt: Runtime, run: RunRef, root: str) -> list[CheckpointRef]:
    """The run's checkpoints; a manifest already read is not read again (it never changes once
    written), only the listing that finds new ones is."""
    refs, problems = list_checkpoints(root, known=rt.manifests.get(run.uid))
    for p in problems:
        log.debug("checkpoint %s skipped: %s", p.checkpoint, p.reason)
    rt.manifests[run.uid] = {r.name: r for r in refs}
    return refs


def _series(rt: Runtime, run: RunRef, body: Mapping[str, Any], attempt: int,
            shared: bool = False) -> tuple[TrainerSeries | None, list[EvalPoint]]:
    cache = rt.caches.setdefault(run.uid, PointCache())
    if rt.prometheus is None:
        return None, list(cache.points.values())
    prometheus, now = rt.prometheus, time.time()
    window = cache.window(parse_time(body["metadata"].get("creationTimestamp")), now)
    # the namespace's read covers its last `wide` seconds and is up to shared_read_s old: it serves
    # a run whose own window fits in that (not a run read for the first time, which needs its life)
    wide = rt.settings.interval_s * 2 + rt.settings.shared_read_s + PointCache.OVERLAP_S
    try:
        if shared and window + rt.settings.shared_read_s <= wide:
            read, _ = rt.series.get(run.namespace, lambda: prometheus.read_namespace(run.namespace, int(wide) + 1))
            series = read.of(run.name, attempt)
        else:
            series = prometheus.read(run.name, run.namespace, attempt, window)
    except PrometheusError as exc:
        # without metrics no gate can fire, but failed pods are still restarted: go on
        log.warning("%s/%s: Prometheus unavailable: %s", run.namespace, run.name, exc)
        return None, [cache.points[k] for k in sorted(cache.points)]
    return series, cache.update(series.points, now)


def _records(rt: Runtime, run: RunRef, root: str) -> Records:
    reader = rt.records.get(run.uid)
    if reader is None or reader.root != root.rstrip("/"):
        reader = rt.records[run.uid] = RunRecords(root)
    return reader.read()


def _storage(rt: Runtime, run: RunRef, root: str, status: CptRunStatus, attempts: Attempts, state: str,
             series: TrainerSeries | None, points: list[EvalPoint],
             shared: bool) -> tuple[list[CheckpointRef], Records]:
    """The run's checkpoints and records: read again unless a timer pass may use the last read."""
    now, view = time.monotonic(), rt.storage.get(run.uid)
    signals = Signals(identity=(root.rstrip("/"), RUN_CREDENTIALS.get()), attempt=status.attempt,
                      steady=status.phase == Phase.running and state == "running" and not attempts.strays,
                      checkpoint_step=series.checkpoint_step if series else None,
                      eval_step=newest_eval(points, status.attempt),
                      anomalies=sum(series.anomalies.values()) if series else 0)
    if shared and view is not None and not storage_due(view, signals, now):
        return view.refs, view.records
    refs, records = _checkpoints(rt, run, root), _records(rt, run, root)
    rt.storage[run.uid] = StorageView(identity=signals.identity, attempt=status.attempt, refs=refs,
                                      stale_at=stale_at(now, rt.settings.storage_max_age_s, random.random()),
                                      records=records, anomalies=signals.anomalies)
    return refs, records


# -- acting ----------------------------------------------------------------------------------
def _start(rt: Runtime, run: RunRef, spec: CptRunSpec, action: StartAttempt) -> None:
    config = trainer_config(run, spec, action, rt.settings)
    for obj in rt.launcher.build(run, spec, config):
        rt.kube.ensure(obj, run)


def _count_decisions(rt: Runtime, run: RunRef, before: CptRunStatus, after: CptRunStatus) -> None:
    for record in after.history[len(before.history):]:
        rt.metrics.gate_breaches.labels(run.namespace, run.name, record.gate).inc()
    if after.rollbacks > before.rollbacks:
        target = after.history[-1].target if after.history else "base"
        rt.metrics.rollbacks.labels(run.namespace, run.name, target).inc()


def _carry_out(rt: Runtime, run: RunRef, spec: CptRunSpec, body: Mapping[str, Any], plan: Plan,
               asks: Requests, before: CptRunStatus, attempts: Attempts) -> None:
    for action in plan.actions:
        if isinstance(action, StartAttempt):
            _start(rt, run, spec, action)
    version = body["metadata"]["resourceVersion"]
    if asks.one_shot:
        # cleared before the decision is recorded: a crash in between loses the request (the user
        # can repeat it) rather than rolling back twice. Cleared at the version they were read at:
        # a request made since then is not wiped unseen (the Conflict runs the pass again).
        version = rt.kube.patch_annotations(run.namespace, run.name, {k: None for k in asks.one_shot}, version)
    rt.kube.patch_status(run, version, body.get("status") or {}, plan.status.dump())
    _count_decisions(rt, run, before, plan.status)
    for action in plan.actions:
        if isinstance(action, StopAttempt):
            rt.kube.delete_job(run.namespace, attempt_name(run.name, action.number))
            if not action.checkpoint:
                rt.kube.delete_pods(run.namespace, selector(run, action.number), rt.settings.rollback_grace_s)
        elif isinstance(action, Release):
            rt.kube.delete_pods(run.namespace, selector(run, action.number), rt.settings.rollback_grace_s,
                                live_only=True)
        elif isinstance(action, Sweep):
            for number in action.numbers:
                for kind, name in attempts.stray_objects.get(number, []):
                    rt.kube.delete(run.namespace, kind, name)
                rt.kube.delete_pods(run.namespace, selector(run, number), rt.settings.rollback_grace_s)
        elif isinstance(action, Emit):
            rt.emit(body, action.type, action.reason, action.message)
        elif isinstance(action, Evaluate):
            for obj in build_evaluation(run, spec, action, rt.settings):
                rt.kube.ensure(obj, run)
        elif isinstance(action, StopEvaluations):
            _delete_evaluations(rt, run, [evaluation_name(run.name, t) for t in action.targets])


def _delete_evaluations(rt: Runtime, run: RunRef, names: Sequence[str]) -> None:
    for name in names:
        rt.kube.delete_job(run.namespace, name)
        rt.kube.delete(run.namespace, "ConfigMap", name)


def _hold_forbidden(rt: Runtime, run: RunRef, body: Mapping[str, Any], status: CptRunStatus, plan: Plan,
                    why: str) -> None:
    """The API server refused the attempt's objects for now: nothing else of the pass is done
    (its status stays as it was, but for Progressing=False naming the refusal), and the start is
    tried again after a doubling delay."""
    backoff = rt.refused.setdefault(run.uid, Backoff())
    delay = backoff.failed(time.monotonic())
    number = next(a.number for a in plan.actions if isinstance(a, StartAttempt))
    message = f"attempt {number} could not be created: {why}; trying again in {delay:.0f} s"
    st = status.model_copy(deep=True)
    set_condition(st, ConditionType.progressing, False, Reason.create_forbidden.value, message, now_rfc3339())
    old = body.get("status") or {}
    rt.kube.patch_status(run, body["metadata"]["resourceVersion"], old, st.dump())
    if backoff.failures == 1:
        rt.emit(body, "Warning", Reason.create_forbidden.value, message)


def _as_body(body: Mapping[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, dict(body)))


_REFUSED = {Reason.invalid_spec: "invalid spec", Reason.wont_fit: "not started", Reason.invalid_object: "not started",
            Reason.checkpoint_uri_in_use: "not started", Reason.s3_secret_unreadable: "not started",
            Reason.kueue_not_installed: "not started", Reason.not_allowed: "not started"}


def _report_invalid(rt: Runtime, run: RunRef, body: Mapping[str, Any], status: CptRunStatus, message: str,
                    reason: Reason = Reason.invalid_spec) -> None:
    """SpecValid=False with `reason`, once: a repeat of the same verdict patches and emits nothing."""
    st = status.model_copy(deep=True)
    st.observed_generation = body["metadata"].get("generation")
    set_condition(st, ConditionType.spec_valid, False, reason.value, message, now_rfc3339())
    st.message = f"{_REFUSED[reason]}: {message}"
    old = body.get("status") or {}
    if st.dump() != old:
        rt.kube.patch_status(run, body["metadata"]["resourceVersion"], old, st.dump())
        rt.emit(body, "Warning", reason.value, message)


# -- the memory check, before an attempt's Job is created -------------------------------------
def _shape(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec) -> ModelShape | str:
    """The base's shape, read once per spec generation (config.json may sit on S3)."""
    key = (body["metadata"].get("generation"), spec.base_model.uri)
    cached = rt.shapes.get(run.uid)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        if not is_object_store(spec.base_model.uri):
            # a path names a file inside the pods' image or volumes, not one the operator may read
            raise ShapeUnavailable(f"{spec.base_model.uri} is not object storage; the operator reads "
                                   "only object-store bases")
        found: ModelShape | str = read_shape(spec.base_model)
    except ShapeUnavailable as exc:
        found = f"memory not planned: {exc}"
        rt.emit(body, "Warning", Reason.plan_unavailable.value, found)
    rt.shapes[run.uid] = (key, found)
    return found


def _wont_fit(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, plan: Plan) -> str | None:
    """Why the attempt `plan` starts cannot fit `resources.gpuMemory` or `resources.memory` (None:
    go on). A base whose shape cannot be read does not block the run; MemoryPlanned says so."""
    if not checked(spec) or not any(isinstance(a, StartAttempt) for a in plan.actions):
        return None
    shape, now = _shape(rt, run, body, spec), now_rfc3339()
    if isinstance(shape, str):
        set_condition(plan.status, ConditionType.memory_planned, False, Reason.plan_unavailable.value, shape, now)
        return None
    problem = refusal(spec, shape)
    if problem is None:
        fits = "; ".join(map(str, usages(spec, shape)))
        set_condition(plan.status, ConditionType.memory_planned, True, Reason.fits.value, fits, now)
    return problem


def _discard_starts(rt: Runtime, run: RunRef, plan: Plan) -> None:
    """Delete what a refused start created before the refusal (its ConfigMap, its Service): the
    attempt was never recorded, so nothing else would own them."""
    for action in plan.actions:
        if isinstance(action, StartAttempt):
            for kind in ("ConfigMap", "Service", "Job"):
                rt.kube.delete(run.namespace, kind, attempt_name(run.name, action.number))


def _refused_object(body: Mapping[str, Any], status: CptRunStatus) -> bool:
    """The API server refused an attempt's objects at this spec generation: the same objects
    would be refused again, so none is sent until the spec changes."""
    return any(c.type == ConditionType.spec_valid.value and c.status == "False"
               and c.reason == Reason.invalid_object.value
               and c.observed_generation == body["metadata"].get("generation") for c in status.conditions)


def _gpus(spec: CptRunSpec, plan: Plan, state: AttemptState) -> int:
    if spec.resources.queue and (state.admission is None or state.admission.state != "admitted"):
        return 0  # a queued gang holds nothing until Kueue admits it
    holding = plan.status.phase in (Phase.running, Phase.rolling_back) and (
        state.state == "running" or any(isinstance(a, StartAttempt) for a in plan.actions))
    return spec.resources.nodes * spec.resources.gpus_per_node if holding else 0


# -- Kueue -----------------------------------------------------------------------------------
def _admission(rt: Runtime, spec: CptRunSpec, attempts: Attempts, state: AttemptState) -> AttemptState:
    """The queued attempt's state with what its Workload says (a Job being deleted has nothing
    more to say: its eviction, if any, is already recorded)."""
    job = attempts.job
    if not spec.resources.queue or job is None or job["metadata"].get("deletionTimestamp"):
        return state
    try:
        workload = rt.kube.job_workload(job["metadata"]["namespace"], job["metadata"]["uid"])
    except KueueMissing:
        return state
    return replace(state, admission=admission(workload))


def _kueue_missing(rt: Runtime, run: RunRef, spec: CptRunSpec, plan: Plan) -> str | None:
    if not spec.resources.queue or not starts(plan) or rt.kube.kueue_installed(run.namespace):
        return None
    return (f"resources.queue is {spec.resources.queue!r} but this cluster has no Kueue (no "
            f"{kueue.WORKLOADS}.{kueue.GROUP} API): a queued Job would never start. Install Kueue "
            "(see the chart's README) or remove resources.queue")


# -- one pass --------------------------------------------------------------------------------
def _attempts(rt: Runtime, run: RunRef, status: CptRunStatus, watched: Children | None = None) -> Attempts:
    """The run's objects by attempt. While its attempt runs undisturbed (most passes) Jobs and
    pods tell everything that matters; ConfigMaps and Services, which hold no pods, are also
    listed on every pass that may start an attempt (so none is adopted with a stale config) or
    follows a change, and on a finished run's passes, where their leftovers are swept. A timer
    pass takes Jobs and pods from the operator's watches (`watched`) when they show the attempt
    running undisturbed; anything else is listed afresh for the run."""
    if watched is not None:
        attempts = group(children_of(watched, run), status.attempt)
        if _steady(rt, status, attempts):
            return attempts
    found = rt.kube.children(run, ("Job", "Pod"))
    attempts = group(found, status.attempt)
    if _steady(rt, status, attempts):
        return attempts
    return group({**found, **rt.kube.children(run, ("ConfigMap", "Service"))}, status.attempt)


def _steady(rt: Runtime, status: CptRunStatus, attempts: Attempts) -> bool:
    return status.phase == Phase.running and not attempts.strays and \
        rt.launcher.attempt_state(status.attempt, attempts.job, attempts.pods).state == "running"


def _observe_attempt(rt: Runtime, spec: CptRunSpec, attempts: Attempts, number: int) -> AttemptState:
    """The attempt as its Job and pods tell it: its state, how its start goes, what Kueue says."""
    state = rt.launcher.attempt_state(number, attempts.job, attempts.pods)
    state = replace(state, start=rt.launcher.start(spec, attempts.job, attempts.pods))
    return _admission(rt, spec, attempts, state)


def _unreadable(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
                problem: str, reason: Reason, watched: Children | None) -> Plan:
    """A pass of a running run whose Secret cannot be used: what its Job and pods show is still
    acted on (`reconcile_unreadable`), its storage is not touched. Like any pass, it acts only
    on fresh reads."""
    def decide(children: Children | None) -> tuple[Plan, Attempts]:
        attempts = _attempts(rt, run, status, children)
        obs = observed(body=body, attempt=_observe_attempt(rt, spec, attempts, status.attempt), series=None,
                       points=[], refs=[], pods_left=attempts.pods_left, strays=attempts.strays)
        return reconcile_unreadable(spec, status, obs, problem, reason), attempts

    plan, attempts = decide(watched)
    if watched is not None and acts(plan, status.phase.value, None):
        plan, attempts = decide(None)
    _carry_out(rt, run, spec, body, plan, Requests(), status, attempts)
    if plan.status.phase in TERMINAL_PHASES:
        rt.forget(run.uid)
    return plan


@dataclass(frozen=True)
class _Decided:
    plan: Plan
    attempts: Attempts
    state: AttemptState
    evaluated: tuple[str, ...] = ()
    """Completed evaluation Jobs whose records are read: deleted by the pass."""


def _decide(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
            root: str, resume: bool, watched: Children | None) -> _Decided:
    """Observe the run (from watches, shared and earlier reads if `watched` is given) and reconcile."""
    number, shared = status.attempt, watched is not None
    attempts = _attempts(rt, run, status, watched)
    state = _observe_attempt(rt, spec, attempts, number)
    if status.phase in TERMINAL_PHASES and not resume:  # nothing left to decide from metrics
        series, points, refs, records = None, list[EvalPoint](), list[CheckpointRef](), Records()
    else:
        series, points = _series(rt, run, body, number, shared)
        refs, records = _storage(rt, run, root, status, attempts, state.state, series, points, shared)
    evaluating, completed = evaluation_runs(attempts.evaluations.get("Job", []), attempts.evaluations.get("Pod", []))
    # a completed Job whose record this pass has not read yet still counts as running: nothing
    # starts it again; once the record is read its Job goes
    judged = {c.name for c in obs_checkpoints(refs, records) if c.evaluated} | ({BASE} if records.base else set())
    evaluating.update({t: EvalRun(state="running") for t in completed if t not in judged})
    obs = observed(body=body, attempt=state, series=series, points=points, refs=refs, records=records,
                   pods_left=attempts.pods_left, strays=attempts.strays, evaluations=evaluating)
    done = tuple(name for t, name in completed.items() if t in judged)
    return _Decided(reconcile(spec, status, obs), attempts, state, done)


@credentials_scope
def reconcile_run(rt: Runtime, namespace: str, name: str, *, watched: Children | None = None) -> Plan | None:
    """One pass. A timer pass gives the Jobs and pods its watches saw (`watched`): it observes
    from them and from shared and earlier reads (`kube.freshness`) and, if that would make it
    act, observes everything afresh and decides again."""
    with rt.lock(f"{namespace}/{name}"), rt.metrics.reconcile_seconds.time():
        body = rt.kube.read_run(namespace, name)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None
        run = RunRef(name=name, namespace=namespace, uid=meta["uid"])
        status = _load_status(body.get("status") or {})
        asks = requests(meta.get("annotations"))
        try:
            spec = CptRunSpec.model_validate(body.get("spec") or {})
            root = checkpoint_root(spec)
        except ValidationError as exc:
            _report_invalid(rt, run, body, status, "; ".join(str(e) for e in errors_from(exc, "spec")))
            return None
        except SpecProblem as exc:
            _report_invalid(rt, run, body, status, str(exc))
            return None
        try:  # every storage access below is the run's own
            use_run_credentials(rt.kube, run, spec, rt.settings.tenancy)
        except SecretUnreadable as exc:  # a finished run keeps the status it ended with
            if status.phase == Phase.running and status.attempt:
                return _unreadable(rt, run, body, spec, status, str(exc), exc.reason, watched)
            if status.phase not in TERMINAL_PHASES or asks.resume:
                _report_invalid(rt, run, body, status, str(exc), exc.reason)
            return None
        decided = _decide(rt, run, body, spec, status, root, asks.resume, watched)
        if watched is not None and acts(decided.plan, status.phase.value, rt.pinned.get(run.uid)):
            decided = _decide(rt, run, body, spec, status, root, asks.resume, None)
        plan, attempts, state = decided.plan, decided.attempts, decided.state
        refused = refusals(spec, rt.settings.tenancy) if starts(plan) else []
        if refused:  # admission did not see this run (stored before the policy, or no policy there)
            _report_invalid(rt, run, body, status, "; ".join(refused), Reason.not_allowed)
            return None
        problem = _wont_fit(rt, run, body, spec, plan)
        if problem is not None:
            _report_invalid(rt, run, body, status, problem, Reason.wont_fit)
            return None
        problem = _kueue_missing(rt, run, spec, plan)
        if problem is not None:
            _report_invalid(rt, run, body, status, problem, Reason.kueue_not_installed)
            return None
        if starts(plan) and _refused_object(body, status):
            return None  # the API server refused this generation's objects: wait for a new spec
        problem = foreign_owner(run, spec, plan)
        if problem is not None:
            _report_invalid(rt, run, body, status, problem, Reason.checkpoint_uri_in_use)
            return None
        unpinned = write_pins(rt.pinned, run, spec, plan)
        if unpinned is not None and prunes(plan):
            hold_start(rt.kube, run, body, status, unpinned)
            return None
        backoff = rt.refused.get(run.uid)
        if backoff is not None and starts(plan) and backoff.waiting(time.monotonic()):
            return None  # refused for now: the condition says when it is tried again
        try:
            _carry_out(rt, run, spec, body, plan, asks, status, attempts)
            _delete_evaluations(rt, run, decided.evaluated)
        except (Rejected, SpecProblem) as exc:  # attempts start first: nothing else was done
            _discard_starts(rt, run, plan)
            _report_invalid(rt, run, body, status, str(exc), Reason.invalid_object)
            return None
        except Forbidden as exc:
            _discard_starts(rt, run, plan)
            _hold_forbidden(rt, run, body, status, plan, str(exc))
            return None
        if starts(plan):
            rt.refused.pop(run.uid, None)
        if plan.status.phase in TERMINAL_PHASES:
            rt.forget(run.uid)
        rt.metrics.observe_run(run.uid, namespace, name, plan.status.phase.value, plan.status.attempt,
                               _gpus(spec, plan, state), plan.status.improved, plan.status.goodput,
                               plan.status.in_place_restarts)
        return plan


def _pass(memo: kopf.Memo, namespace: str | None, name: str | None,
          logger: logging.Logger | logging.LoggerAdapter[Any], watched: Children | None = None) -> None:
    from kubernetes.client.exceptions import ApiException

    assert namespace and name, "CptRun is namespaced"
    try:
        reconcile_run(memo.runtime, namespace, name, watched=watched)
    except Conflict as exc:
        raise kopf.TemporaryError(str(exc), delay=1) from exc
    except NotOurs as exc:
        logger.error("%s", exc)
        raise kopf.TemporaryError(str(exc), delay=30) from exc
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise kopf.TemporaryError(f"Kubernetes API: {exc.status} {exc.reason}", delay=5) from exc
    except OSError as exc:  # the checkpoint store: kopf posts the message as an event, so summarised
        log.warning("%s/%s: checkpoint store: %s", namespace, name, exc)  # not kopf's logger: no event
        raise kopf.TemporaryError(f"checkpoint store: {summarise_error(exc)}", delay=10) from exc


# -- kopf wiring -----------------------------------------------------------------------------
@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from prometheus_client import start_http_server

    from .webhook import make_app, serve

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="cpt.mlops.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="cpt.mlops.dev", key="last-handled-configuration")
    # kopf's watches can stall silently without timeouts (kopf #585, #1120)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Namespaced installs get no cluster-wide RBAC: serve the named namespaces and the CRDs
    # found at start-up instead of watching namespaces and CRDs (which would only log denials).
    settings.scanning.disabled = bool(SETTINGS.namespaces)
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = WORKERS
    runtime = build_runtime(SETTINGS)
    memo.runtime = runtime
    start_http_server(SETTINGS.metrics_port, registry=runtime.metrics.registry)
    memo.webhook = await serve(make_app(SETTINGS.webhook_token, runtime.record_alert), SETTINGS.webhook_port)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "webhook", None) is not None:
        await memo.webhook.cleanup()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(*, namespace: str | None, name: str | None, memo: kopf.Memo,
              logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    _pass(memo, namespace, name, logger)


def finished(status: Mapping[str, Any] | None) -> bool:
    return (status or {}).get("phase") in {p.value for p in TERMINAL_PHASES}


def settled(status: Mapping[str, Any] | None, annotations: Mapping[str, str] | None) -> bool:
    """Finished with nothing asked of it: looked at rarely. A resume request makes the run
    active again at once (its next attempt may wait for the last one's pods, pass after pass)."""
    return finished(status) and not requests(annotations).resume


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.interval_s, sharp=False,
            when=lambda status, annotations, **_: not settled(status, annotations))
def on_timer(*, namespace: str | None, name: str | None, memo: kopf.Memo,
             logger: logging.Logger | logging.LoggerAdapter[Any], **indices: Any) -> None:
    """A steady look at an active run, from what the watches saw (`run_jobs`, `run_pods`)."""
    key = (namespace, run_label(name or ""))
    # list() of a store is one C-level copy under the GIL: safe while kopf's loop updates it
    watched = {kind: list(indices[index].get(key, [])) for kind, index in (("Job", "run_jobs"), ("Pod", "run_pods"))}
    _pass(memo, namespace, name, logger, watched)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.finished_interval_s, sharp=False,
            initial_delay=SETTINGS.finished_interval_s,
            when=lambda status, annotations, **_: settled(status, annotations))
def on_finished_timer(*, namespace: str | None, name: str | None, memo: kopf.Memo,
                      logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """A finished run is looked at rarely: kopf stops one timer and starts the other as the
    phase changes (its filters are matched on every change of the run)."""
    _pass(memo, namespace, name, logger)


def _watched(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a timer pass needs of a Job or pod (names, uid, labels, owners, deletion, status): kept
    for every one of them, so without the spec and managedFields."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "ownerReferences", "deletionTimestamp")
            if k in meta}
    return {"kind": body.get("kind"), "metadata": kept, "status": dict(body.get("status") or {})}


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def run_jobs(*, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    """Every run's Jobs, by (namespace, run label), as the watch last saw them."""
    return {(namespace, labels[LABEL_RUN]): _watched(body)}


@kopf.index("v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
def run_pods(*, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    """Every run's pods, likewise: timer passes read these instead of listing them."""
    return {(namespace, labels[LABEL_RUN]): _watched(body)}


def _job_moved(body: Mapping[str, Any], **kwargs: Any) -> bool:
    """A Job event worth a pass now: it ended, failed, or went. A running Job's other updates
    (pods becoming ready, counts) change nothing a pass decides; the timer sees them."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return kwargs.get("type") == "DELETED" or bool(body.get("metadata", {}).get("deletionTimestamp")) or \
        any(c.get("status") == "True" for c in conditions)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT}, when=_job_moved)
def on_job_event(*, body: kopf.Body, namespace: str | None, memo: kopf.Memo,
                 logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """A Job of a run changed (finished, failed, deleted): decide now rather than at the next tick."""
    owner = next((ref for ref in body.get("metadata", {}).get("ownerReferences") or []
                  if ref.get("kind") == "CptRun" and ref.get("apiVersion", "").startswith(f"{GROUP}/")), None)
    if owner is not None and getattr(memo, "runtime", None) is not None:
        _pass(memo, namespace, owner["name"], logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(*, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """The finalizer: stop every attempt; checkpoints stay where they are."""
    assert namespace, "CptRun is namespaced"
    rt: Runtime = memo.runtime
    run = RunRef(name=name, namespace=namespace, uid=body["metadata"]["uid"])
    stopped = [job for job in rt.kube.run_jobs(run) if rt.kube.delete_job(namespace, job)]
    log.info("%s/%s deleted: stopped %s; checkpoints are kept", namespace, name, ", ".join(stopped) or "nothing")
    rt.metrics.forget_run(run.uid, namespace, name)
    rt.forget(run.uid, deleted=True)
    with rt.guard:
        rt.locks.pop(f"{namespace}/{name}", None)
