"""The faults of tests/faults and the machinery that injects them.

A schedule is a list of `Fault`s, each tied to a milestone of the run (the first attempt
training, the breach, the rollback...) plus a delay drawn from the seed, so that a seed replays
the same faults at the same points of the run's progress whatever the machine's speed. An
`Injector` fires them as the milestones are reached; a `Writer` is the concurrent client that
keeps patching the run and its Job for the whole faulted run (the operator's status patches
carry a resourceVersion, so its writes meet 409 Conflicts).
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from tests.cluster.cluster import Toxiproxy, etcd_compact

MILESTONES = ("applied", "a1-training", "a1-checkpointed", "rolling-back", "tuned-started",
              "tuned-training", "tuned-checkpointed", "restarted", "succeeded")
"""In the order a run reaches them. `tuned-*`: the attempts after the rollback (with its
overrides); `restarted`: an attempt after the rollback's, started because one failed."""


@dataclass(frozen=True)
class Fault:
    milestone: str
    delay_s: float
    kind: str
    duration_s: float = 0.0

    def __str__(self) -> str:
        lasting = f" for {self.duration_s:.1f} s" if self.duration_s else ""
        return f"{self.milestone} + {self.delay_s:.1f} s: {self.kind}{lasting}"


# (milestone, kind, longest delay, duration): the seed draws each delay in [0, longest]
PLAN: tuple[tuple[str, str, float, float], ...] = (
    ("applied", "kill-operator", 3.0, 0),
    ("a1-training", "api-latency", 1.0, 8.0),
    ("a1-training", "s3-reset", 1.0, 2.0),
    ("a1-training", "kill-operator", 2.0, 0),
    ("a1-checkpointed", "s3-timeout", 0.5, 3.0),
    ("a1-checkpointed", "api-reset", 0.5, 3.0),
    ("a1-checkpointed", "kill-operator", 1.0, 0),
    ("rolling-back", "kill-operator", 0.0, 0),  # mid-rollback: stop recorded, Job being deleted
    ("rolling-back", "drop-watches", 0.5, 0),
    ("rolling-back", "kill-trainer", 1.0, 0),   # attempt 1 while it saves on SIGTERM
    ("rolling-back", "kill-operator", 1.0, 0),  # mid-rollback again, after the restart
    ("tuned-started", "s3-reset", 0.0, 3.0),       # the restore of the rollback target
    ("tuned-started", "kill-operator", 0.5, 0),
    ("tuned-training", "compact-etcd", 1.0, 0),
    ("tuned-training", "api-reset", 2.0, 3.0),
    ("tuned-training", "kill-operator", 3.0, 0),
    ("tuned-checkpointed", "s3-timeout", 0.5, 3.0),
    ("tuned-checkpointed", "api-latency", 0.5, 5.0),
    ("tuned-checkpointed", "kill-trainer", 2.0, 0),
    ("tuned-checkpointed", "kill-operator", 3.0, 0),
    ("restarted", "kill-operator", 1.0, 0),
    ("restarted", "drop-watches", 2.0, 0),
    ("succeeded", "kill-operator", 0.0, 0),     # a finished run must stay as it is
)


def schedule(seed: int) -> list[Fault]:
    rng = random.Random(seed)
    return [Fault(m, round(rng.uniform(0, longest), 1), kind, duration)
            for m, kind, longest, duration in PLAN]


# -- the concurrent writer --------------------------------------------------------------------
class Writer(threading.Thread):
    """Merge-patches the CptRun's labels and annotations and its current Job's annotations in a
    loop, straight to the API server (not through the faulty proxy)."""

    def __init__(self, kube: Any, namespace: str, run: str, interval_s: float = 0.5):
        super().__init__(daemon=True, name="writer")
        self.kube, self.namespace, self.run_name, self.interval_s = kube, namespace, run, interval_s
        self.done = threading.Event()
        self.writes: Counter[str] = Counter()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.kube.server}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/merge-patch+json"})
        with urllib.request.urlopen(req, timeout=10, context=self.kube.ssl_context) as resp:
            return json.loads(resp.read())

    def run(self) -> None:
        n = 0
        ns = f"/namespaces/{self.namespace}"
        while not self.done.wait(self.interval_s):
            n += 1
            mark = {"labels": {"faults.test/writer": str(n)}, "annotations": {"faults.test/writer": str(n)}}
            try:
                self._request("PATCH", f"/apis/cpt.mlops.dev/v1alpha1{ns}/cptruns/{self.run_name}", {"metadata": mark})
                self.writes["cptrun"] += 1
                selector = f"labelSelector=cpt.mlops.dev/run%3D{self.run_name}"
                jobs = self._request("GET", f"/apis/batch/v1{ns}/jobs?{selector}")
                for job in jobs["items"]:
                    self._request("PATCH", f"/apis/batch/v1{ns}/jobs/{job['metadata']['name']}",
                                  {"metadata": {"annotations": mark["annotations"]}})
                    self.writes["job"] += 1
            except (urllib.error.URLError, OSError):  # a Job deleted between list and patch
                self.writes["missed"] += 1

    def stop(self) -> None:
        self.done.set()
        self.join(15)


# -- the injector -----------------------------------------------------------------------------
@dataclass
class Injector:
    """Fires a schedule's faults as the run reaches their milestones and undoes the lasting ones."""

    faults: list[Fault]
    toxiproxy: Toxiproxy
    etcd_url: str
    kill_operator: Callable[[], None]
    kill_trainer: Callable[[bool], bool]
    """(the first attempt's, else the newest attempt's) -> whether a live trainer was killed"""
    phase: Callable[[], str]
    log: Callable[[str], None] = print
    reached: dict[str, float] = field(default_factory=dict)
    fired: list[tuple[float, Fault, str]] = field(default_factory=list)
    pending_undo: list[tuple[float, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _seq: int = 0

    def tick(self, milestones: set[str]) -> None:
        now = time.monotonic()
        for m in MILESTONES:
            if m in milestones and m not in self.reached:
                self.reached[m] = now
                self.log(f"[faults] {now - self.started:6.1f} s milestone {m}")
        for at, proxy, toxic in [u for u in self.pending_undo if u[0] <= now]:
            self.toxiproxy.remove_toxic(proxy, toxic)
            self.pending_undo.remove((at, proxy, toxic))
        done = {id(f) for _, f, _ in self.fired}
        for fault in self.faults:
            if id(fault) not in done and fault.milestone in self.reached \
                    and now >= self.reached[fault.milestone] + fault.delay_s:
                note = self._fire(fault)
                self.fired.append((now - self.started, fault, note))
                self.log(f"[faults] {now - self.started:6.1f} s {fault} -> {note}")

    def clear(self) -> None:
        self.toxiproxy.reset()
        self.pending_undo.clear()

    def _toxic(self, proxy: str, kind: str, duration: float, **attrs: Any) -> str:
        self._seq += 1
        names = []
        for stream in ("upstream", "downstream"):
            name = f"{kind}-{self._seq}-{stream}"
            self.toxiproxy.add_toxic(proxy, name, kind, stream=stream, **attrs)
            self.pending_undo.append((time.monotonic() + duration, proxy, name))
            names.append(name)
        return "+".join(names)

    def _fire(self, fault: Fault) -> str:
        kind, phase = fault.kind, self.phase()
        if kind == "kill-operator":
            self.kill_operator()
            return f"operator SIGKILLed in phase {phase}"
        if kind == "kill-trainer":
            first = not fault.milestone.startswith(("tuned", "restarted"))
            which = "attempt 1's" if first else "the newest attempt's"
            killed = self.kill_trainer(first)
            return f"{which} trainer SIGKILLed" if killed else f"{which} trainer not alive: none killed"
        if kind == "api-latency":
            return self._toxic("api", "latency", fault.duration_s, latency=300, jitter=200)
        if kind == "api-reset":
            return self._toxic("api", "reset_peer", fault.duration_s, timeout=0)
        if kind == "drop-watches":
            self.toxiproxy.cut("api")
            return "every API connection closed (watch streams dropped)"
        if kind == "compact-etcd":
            revision = etcd_compact(self.etcd_url)
            self.toxiproxy.cut("api")
            return f"etcd compacted at revision {revision}, API connections closed"
        if kind == "s3-reset":
            return self._toxic("s3", "reset_peer", fault.duration_s, timeout=0)
        if kind == "s3-timeout":
            return self._toxic("s3", "timeout", fault.duration_s, timeout=1500)
        raise ValueError(f"unknown fault {kind}")

    def counts(self) -> Counter[str]:
        return Counter(f.kind for _, f, note in self.fired if "none killed" not in note)


def sigkill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
