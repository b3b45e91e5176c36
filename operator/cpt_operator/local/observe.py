"""Turn a local run's files and processes into the reconcile core's `Observed`."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from ..api.events import Anomaly, Evaluated, Finished, Progress, Started
from ..api.skips import DataSkip, merge_skips
from ..policy.types import CheckpointEvals, EvalPoint
from ..reconcile import AttemptState, Observed
from ..store import list_checkpoints
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
    points: list[EvalPoint] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)
    anomalies: Counter[str] = field(default_factory=Counter)
    skips: list[DataSkip] = field(default_factory=list)
    last_progress: Progress | None = None
    started: Started | None = None
    finished: Finished | None = None

    def update(self) -> list[object]:
        events = self.follower.read_new()
        for ev in events:
            self._take(ev)
        return events

    def _take(self, ev: object) -> None:
        if isinstance(ev, Evaluated):
            if ev.is_base:
                self.base = dict(ev.metrics)
            else:
                name = f"attempt-{self.number:03d}/{ev.checkpoint}" if ev.checkpoint else None
                self.points.append(EvalPoint(attempt=self.number, step=ev.step, tokens=ev.tokens,
                                             metrics=dict(ev.metrics), checkpoint=name))
        elif isinstance(ev, Anomaly):
            self.anomalies[ev.kind] += 1
            if ev.skip is not None:
                self.skips = merge_skips(self.skips, [ev.skip])
        elif isinstance(ev, Progress):
            self.last_progress = ev
        elif isinstance(ev, Started):
            self.started = ev
        elif isinstance(ev, Finished):
            self.finished = ev


class LocalObserver:
    def __init__(self, run_dir: RunDir, checkpoint_root: str):
        self.run_dir, self.checkpoint_root = run_dir, checkpoint_root
        self.logs: dict[int, AttemptLog] = {}

    def log(self, number: int) -> AttemptLog:
        if number not in self.logs:
            path = self.run_dir.attempt(number) / "events.jsonl"
            self.logs[number] = AttemptLog(number, EventFollower(path))
        return self.logs[number]

    def attempt_state(self, number: int, proc: TrainerProcess | None) -> AttemptState:
        log = self.log(number)
        step = log.last_progress.step if log.last_progress else (log.started.step if log.started else 0)
        tokens = log.last_progress.tokens if log.last_progress else (log.started.tokens if log.started else 0)
        if number == 0:
            return AttemptState(number=0, state="absent")
        if proc is not None and proc.poll() is None:
            return AttemptState(number=number, state="running", step=step, tokens=tokens)
        if log.finished and log.finished.reason == "budget":
            return AttemptState(number=number, state="succeeded", step=log.finished.step, tokens=log.finished.tokens)
        if log.finished and log.finished.reason == "interrupted":
            return AttemptState(number=number, state="stopped", step=log.finished.step, tokens=log.finished.tokens)
        message = log.finished.message if log.finished else self._crash_message(number, proc)
        refused = bool(log.finished and log.finished.message.startswith("refused:"))
        return AttemptState(number=number, state="failed", message=message, step=step, tokens=tokens,
                            refused=refused)

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
                rollback_to: str | None = None, resume: bool = False) -> Observed:
        for n in range(1, number + 1):
            self.log(n).update()
        refs, _ = list_checkpoints(self.checkpoint_root)
        # The manifest knows whether anomalies preceded a checkpoint; the event does not.
        unstable = {r.name for r in refs if not r.manifest.stable}
        points = [replace(p, stable=p.checkpoint not in unstable)
                  for log in self.logs.values() for p in log.points]
        base = next((log.base for log in self.logs.values() if log.base), {})
        checkpoints = [CheckpointEvals(name=r.name, step=r.manifest.step, tokens=r.manifest.tokens,
                                       evals=dict(r.manifest.evals), attempt=r.attempt,
                                       stable=r.manifest.stable) for r in refs]
        anomalies = dict(self.log(number).anomalies) if number else {}
        skips = tuple(self.log(number).skips) if number else ()
        return Observed(attempt=self.attempt_state(number, proc), now=now_rfc3339(), base=base,
                        points=points, anomalies=anomalies, skips=skips, checkpoints=checkpoints,
                        stop_requested=stop, rollback_to=rollback_to, resume=resume)

    def problems(self) -> list[str]:
        _, problems = list_checkpoints(self.checkpoint_root)
        return [f"{p.checkpoint}: {p.reason}" for p in problems]


def attempt_events_path(run_dir: RunDir, number: int) -> Path:
    return run_dir.attempt(number) / "events.jsonl"
