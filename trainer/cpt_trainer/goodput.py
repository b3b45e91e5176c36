"""The trainer's account of its own time (`api.goodput.TrainerTimes`), reported with its events
and metrics: the control plane turns it into the run's goodput (`policy.goodput`).

One account per attempt. A trainer that torchrun restarted in place (`--max-restarts`) finds its
predecessor's last report in the attempt's event log (rank 0's run directory outlives its
workers) and carries it on: the steps its predecessor did after the last committed checkpoint are
lost (`lost_steps`), the time from that report to this process's start is the failure's
(`failures`). The log, not torchrun's restart count, says whether this is a restart: each node's
agent counts only its own workers' failures, so rank 0's count misses a restart that another
node's failure caused.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from cpt_api.goodput import TrainerTimes
from .events import logged_newest_first

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
"""torchrun's count of its workers' restarts (0 at the first start)."""


def restart_count() -> int:
    try:
        return int(os.environ.get(RESTART_ENV, "0"))
    except ValueError:
        return 0


def process_start() -> float:
    """Unix time this process started (Linux: from /proc, so interpreter and torch imports count
    as the start's; elsewhere: now)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def last_report(run_dir: str) -> TrainerTimes | None:
    """The newest `times` an earlier trainer of this attempt wrote to its event log."""
    times = next((e["times"] for e in logged_newest_first(run_dir) if e.get("times")), None)
    return TrainerTimes.model_validate(times) if times else None


class TimeAccount:
    """Seconds by part of the trainer's time. Parts nest: a step's time excludes the evaluation
    or save it ran at its boundary, which count as themselves."""

    def __init__(self, run_dir: str, started: float | None = None):
        now = started if started is not None else process_start()
        before = last_report(run_dir)
        self.restarts = max(restart_count(), before.restarts + 1 if before is not None else 0)
        self.times = TrainerTimes(began=now, reported=now, restarts=self.restarts)
        if before is not None:
            self.times = before.model_copy(update={
                "reported": now, "restarts": self.restarts, "steps": before.committed,
                "lost_steps": before.lost_steps + max(0.0, before.steps - before.committed),
                "failures": before.failures + max(0.0, now - before.reported)})
        self._began = now
        self._carried = before is not None
        self._nested = 0.0
        self._step: tuple[float, float] | None = None
        """The step under way: when it began, and the nested time then."""
        self._at_save: dict[int, float] = {}

    @property
    def restarted(self) -> bool:
        return self.restarts > 0

    def add(self, part: str, seconds: float) -> None:
        setattr(self.times, part, getattr(self.times, part) + seconds)
        self._nested += seconds

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - began)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One loop iteration: its time less the parts timed inside it is step time."""
        self._step = (time.perf_counter(), self._nested)
        try:
            yield
        finally:
            self.times.steps += self._in_step()
            self._step = None

    def _in_step(self) -> float:
        if self._step is None:
            return 0.0
        began, nested = self._step
        return max(0.0, time.perf_counter() - began - (self._nested - nested))

    def started(self, step: int) -> None:
        """The trainer is ready to train from `step`: its start so far was restoring."""
        if not self._carried:
            self.times.first_step = step
        self.times.step = step
        self.times.restoring += max(0.0, time.time() - self._began)

    def saving(self, step: int) -> None:
        """A save of `step` began: once committed, the steps up to it are safe."""
        self._at_save[step] = self.times.steps + self._in_step()
        self.times.saves += 1

    def committed(self, step: int) -> None:
        if step in self._at_save:
            self.times.committed = self._at_save.pop(step)

    def report(self, step: int) -> TrainerTimes:
        self.times.step = step
        self.times.reported = time.time()
        return self.times.model_copy()
