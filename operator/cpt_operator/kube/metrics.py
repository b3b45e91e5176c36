"""The operator's own metrics: decisions (breaches, rollbacks), runs by phase, GPUs held, and
whether a run has anything better than its base."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cpt_api.goodput import CAUSES, Goodput
from cpt_api.status import Phase


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gate_breaches = Counter("cpt_gate_breaches_total", "Gates (and alerts, anomaly rules) that fired",
                                     ["namespace", "run", "gate"], registry=r)
        self.rollbacks = Counter("cpt_rollbacks_total", "Rollbacks and tune restarts, by restore target",
                                 ["namespace", "run", "target"], registry=r)
        self.runs = Gauge("cpt_runs", "CptRuns by phase", ["phase"], registry=r)
        self.attempt = Gauge("cpt_run_attempt", "Current attempt of a run", ["namespace", "run"], registry=r)
        self.gpus = Gauge("cpt_run_gpus", "GPUs held by a run's running attempt", ["namespace", "run"], registry=r)
        self.improved = Gauge("cpt_run_improved", "1 when the run has a checkpoint better than its base, "
                              "0 when the base is the choice (condition Improved); absent until judged",
                              ["namespace", "run"], registry=r)
        self.goodput = Gauge("cpt_run_goodput_ratio", "Share of the run's wall time spent in optimizer steps "
                             "it keeps (status.goodput.share)", ["namespace", "run"], registry=r)
        self.time_by_cause = Gauge("cpt_run_time_seconds", "The run's wall time so far by cause "
                                   "(status.goodput.seconds: productive, starting, restoring, ...)",
                                   ["namespace", "run", "cause"], registry=r)
        self.in_place = Gauge("cpt_run_in_place_restarts", "Trainers restarted inside their attempt "
                              "(status.inPlaceRestarts)", ["namespace", "run"], registry=r)
        self.reconcile_seconds = Histogram("cpt_reconcile_seconds", "Time of one reconcile pass",
                                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                           registry=r)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in Phase:
            self.runs.labels(phase.value).set(0)

    def observe_run(self, key: str, namespace: str, run: str, phase: str, attempt: int, gpus: int,
                    improved: bool | None = None, goodput: Goodput | None = None,
                    in_place_restarts: int = 0) -> None:
        self.attempt.labels(namespace, run).set(attempt)
        self.gpus.labels(namespace, run).set(gpus)
        self.in_place.labels(namespace, run).set(in_place_restarts)
        if improved is not None:
            self.improved.labels(namespace, run).set(1 if improved else 0)
        if goodput is not None and goodput.share is not None:
            self.goodput.labels(namespace, run).set(goodput.share)
            for cause, seconds in goodput.seconds.items():
                self.time_by_cause.labels(namespace, run, cause).set(seconds)
        with self._lock:
            self._phases[key] = phase
            self._count()

    def forget_run(self, key: str, namespace: str, run: str) -> None:
        for gauge in (self.attempt, self.gpus, self.improved, self.goodput, self.in_place):
            try:
                gauge.remove(namespace, run)
            except KeyError:
                pass
        for cause in CAUSES:
            try:
                self.time_by_cause.remove(namespace, run, cause.value)
            except KeyError:
                pass
        with self._lock:
            self._phases.pop(key, None)
            self._count()

    def _count(self) -> None:
        for phase in Phase:
            self.runs.labels(phase.value).set(sum(1 for p in self._phases.values() if p == phase.value))
