"""Turn a local run's files and processes into the reconcile core's `Observed`.

The trainer's events.jsonl says how an attempt progresses and ends; its evaluations, the base's
reference and digest come from the records in the checkpoint store, read and merged with the
manifests exactly as the operator does (`cpt_operator.records`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from cpt_api.exit_codes import EXIT_REFUSED
from cpt_api.manifest import EVENTS
from cpt_api.events import Anomaly, Evaluated, Finished, Progress, Started
from cpt_api.goodput import TrainerTimes
from ..policy.evaluations import EvalRun
from ..reconcile import AttemptState, Observed
from ..records import RunRecords, checkpoint_evals, merge_points
from cpt_api.store import list_checkpoints
from .events import EventFollower
from .launcher import TrainerProcess
from .rundir import RunDir


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class AttemptLog:
    """Everything one attempt's events.jsonl has said so far."""

    number: int
    follower: EventFollower
    anomalies: Counter[str] = field(default_factory=Counter)
    last_progress: Progress | None = None
    started: Started | None = None
    finished: Finished | None = None
    last_eval: Evaluated | None = None
    times: TrainerTimes | None = None
    """The trainer's latest account of its time."""

    def update(self) -> list[object]:
        events = self.follower.read_new()
        for ev in events:
            self._take(ev)
        return events

    def _take(self, ev: object) -> None:
        if isinstance(ev, (Started, Progress, Finished)) and ev.times is not None:
            self.times = ev.times
        if isinstance(ev, Anomaly):
            self.anomalies[ev.kind] += 1
        elif isinstance(ev, Progress):
            self.last_progress = ev
        elif isinstance(ev, Started):
            self.started = ev
        elif isinstance(ev, Finished):
            self.finished = ev
        elif isinstance(ev, Evaluated):
            self.last_eval = ev


class LocalObserver:
    def __init__(self, run_dir: RunDir, checkpoint_root: str):
        self.run_dir, self.checkpoint_root = run_dir, checkpoint_root
        self.logs: dict[int, AttemptLog] = {}
        self.records = RunRecords(checkpoint_root)

    def log(self, number: int) -> AttemptLog:
        if number not in self.logs:
            path = self.run_dir.attempt(number) / EVENTS
            self.logs[number] = AttemptLog(number, EventFollower(path))
        return self.logs[number]

    def attempt_state(self, number: int, proc: TrainerProcess | None) -> AttemptState:
        log = self.log(number)
        step = log.last_progress.step if log.last_progress else (log.started.step if log.started else 0)
        tokens = log.last_progress.tokens if log.last_progress else (log.started.tokens if log.started else 0)
        if number == 0:
            return AttemptState(number=0, state="absent")
        times = log.times
        if proc is not None and proc.poll() is None:
            return AttemptState(number=number, state="running", step=step, tokens=tokens, times=times)
        if log.finished and log.finished.reason == "budget":
            return AttemptState(number=number, state="succeeded", step=log.finished.step, tokens=log.finished.tokens,
                                times=times)
        if log.finished and log.finished.reason == "interrupted":
            return AttemptState(number=number, state="stopped", step=log.finished.step, tokens=log.finished.tokens,
                                times=times)
        message = log.finished.message if log.finished else self._crash_message(number, proc)
        refused = bool(log.finished and log.finished.reason == "refused") or \
            (proc is not None and proc.poll() == EXIT_REFUSED)
        return AttemptState(number=number, state="failed", message=message, step=step, tokens=tokens,
                            refused=refused, times=times)

    def _crash_message(self, number: int, proc: TrainerProcess | None) -> str:
        code = proc.poll() if proc else None
        tail = ""
        log_file = self.run_dir.attempt(number) / "trainer.log"
        if log_file.exists():
            lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
            errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
            tail = (errors or lines or [""])[-1][:300]
        return f"trainer exited with code {code}: {tail}" if code is not None else f"no trainer process: {tail}"

    def observe(self, number: int, proc: TrainerProcess | None, *, stop: bool = False,
                rollback_to: str | None = None, resume: bool = False,
                evaluations: Mapping[str, EvalRun] | None = None) -> Observed:
        for n in range(1, number + 1):
            self.log(n).update()
        refs, _ = list_checkpoints(self.checkpoint_root)
        records = self.records.read()
        checkpoints = checkpoint_evals(refs, records)
        anomalies = dict(self.log(number).anomalies) if number else {}
        skips = tuple(records.skips.get(number, ()))
        return Observed(attempt=self.attempt_state(number, proc), now=now_rfc3339(), base=records.base,
                        base_sha256=records.base_sha256, points=merge_points((), records.points, refs),
                        anomalies=anomalies, skips=skips, checkpoints=checkpoints,
                        stop_requested=stop, rollback_to=rollback_to, resume=resume,
                        evaluations=dict(evaluations or {}))

    def problems(self) -> list[str]:
        _, problems = list_checkpoints(self.checkpoint_root)
        return [f"{p.checkpoint}: {p.reason}" for p in problems]


def attempt_events_path(run_dir: RunDir, number: int) -> Path:
    return run_dir.attempt(number) / EVENTS
