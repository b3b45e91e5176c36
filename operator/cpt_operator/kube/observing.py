"""What one pass observes of a run, cheaply where it may: its Jobs and pods (from the watches on a
steady timer pass), Prometheus (the namespace's shared read), its checkpoints and records (the
last read while nothing changed, `kube.freshness`); and the decision on it (`decide`)."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping

from cpt_api.spec import CptRunSpec
from cpt_api.storage import RUN_CREDENTIALS
from cpt_api.status import BASE, TERMINAL_PHASES, CptRunStatus, Phase
from ..policy.admission import admission
from ..policy.types import EvalPoint
from ..policy.evaluations import EvalRun
from ..reconcile import AttemptState, Plan, reconcile
from ..records import Records, RunRecords, checkpoint_evals as obs_checkpoints
from cpt_api.store import CheckpointRef, list_checkpoints
from .attempts import Attempts, Children, group
from .builders import RunRef
from .client import KueueMissing, children_of
from .freshness import Signals, StorageView, newest_eval, stale_at, storage_due
from .evaluations import runs as evaluation_runs
from .observe import PointCache, observed, parse_time
from .prometheus import PrometheusError, TrainerSeries
from .runtime import Runtime

log = logging.getLogger(__name__)


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


# -- one pass --------------------------------------------------------------------------------
def run_attempts(rt: Runtime, run: RunRef, status: CptRunStatus, watched: Children | None = None) -> Attempts:
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


def observe_attempt(rt: Runtime, spec: CptRunSpec, attempts: Attempts, number: int) -> AttemptState:
    """The attempt as its Job and pods tell it: its state, how its start goes, what Kueue says."""
    state = rt.launcher.attempt_state(number, attempts.job, attempts.pods)
    state = replace(state, start=rt.launcher.start(spec, attempts.job, attempts.pods))
    return _admission(rt, spec, attempts, state)


@dataclass(frozen=True)
class Decided:
    plan: Plan
    attempts: Attempts
    state: AttemptState
    evaluated: tuple[str, ...] = ()
    """Completed evaluation Jobs whose records are read: deleted by the pass."""


def decide(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
            root: str, resume: bool, watched: Children | None) -> Decided:
    """Observe the run (from watches, shared and earlier reads if `watched` is given) and reconcile."""
    number, shared = status.attempt, watched is not None
    attempts = run_attempts(rt, run, status, watched)
    state = observe_attempt(rt, spec, attempts, number)
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
    return Decided(reconcile(spec, status, obs), attempts, state, done)
