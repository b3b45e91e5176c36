"""Where a run's wall time goes: what a trainer measures of its own time, the causes the control
plane sorts a run's time into, and the goodput it reports (productive time / wall time).

Goodput in the sense of Google's ML Goodput and Llama 3's "effective training time": only the
time of optimizer steps the run keeps counts. Steps computed after the last checkpoint and lost
to a failure are badput when they are lost (`lostSteps`), so computing them again is productive;
steps a rollback throws away are badput (`rollbacks`) at the rollback.

The trainer reports `TrainerTimes` (events on this machine, the `cpt_trainer_seconds{part}`
gauge on a cluster); the pure `policy.goodput` turns them and the attempts' own times into
`Goodput`, kept in `status.goodput`.
"""
from __future__ import annotations

from enum import Enum

from pydantic import Field

from .base import SpecModel


class Cause(str, Enum):
    productive = "productive"
    """Optimizer steps the run keeps."""
    starting = "starting"
    """From an attempt's creation to its trainer process: queueing, scheduling, image pull,
    container and torchrun start."""
    restoring = "restoring"
    """The trainer's own start: loading the base or a checkpoint, data set-up (each start, in-place
    restarts included)."""
    evaluating = "evaluating"
    """Inline evaluations that stalled training (none with `evaluation.placement: separate`)."""
    checkpointing = "checkpointing"
    """Time the loop was blocked by checkpoint saves (the background part of an async save is not)."""
    anomalies = "anomalies"
    """Restores of the last stable weights after a loss spike or non-finite step."""
    lost_steps = "lostSteps"
    """Steps computed after the last committed checkpoint and lost to a failure: the run computes
    them again."""
    failures = "failures"
    """From a trainer's last report to its replacement: the rest of a failure (detection, the
    workers' restart or the next attempt's creation)."""
    rollbacks = "rollbacks"
    """Steps a rollback threw away, and stopping the attempt it ended."""
    other = "other"
    """What no report covers: the trainer's time between reports while it runs or after it
    finished, and its loop's own bookkeeping."""


CAUSES = tuple(Cause)

TIMES_SERIES = "cpt_trainer_times"
"""The trainer's gauge of its `TrainerTimes`, one series per field (label `part`, the field's
Python name)."""


class TrainerTimes(SpecModel):
    """What an attempt's trainer measured of its own time (rank 0), cumulative over the attempt:
    a trainer restarted in place carries its predecessor's figures on."""

    began: float
    """Unix time the attempt's first trainer process started."""
    reported: float
    """Unix time of this report."""
    first_step: int = 0
    """The step the attempt started from (its restore point's)."""
    step: int = 0
    """The last step done."""
    restoring: float = 0.0
    steps: float = 0.0
    """Seconds in optimizer steps (data, forward, backward, update)."""
    committed: float = 0.0
    """Of `steps`, the seconds of the steps the newest committed checkpoint holds."""
    evaluating: float = 0.0
    checkpointing: float = 0.0
    anomalies: float = 0.0
    lost_steps: float = 0.0
    """Steps lost to in-place restarts (done after the last checkpoint before the crash)."""
    failures: float = 0.0
    """In-place restarts: from the crashed trainer's last report to its successor's start."""
    restarts: int = 0
    """In-place restarts of this attempt's trainers (torchrun `--max-restarts`)."""
    saves: int = 0
    """Checkpoint saves begun (their stall is `checkpointing`)."""


class Goodput(SpecModel):
    """status.goodput: the run's wall time by cause, and the share that was productive."""

    since: float | None = None
    """Unix time the run's first attempt was created."""
    until: float | None = None
    """Unix time of this account (frozen when the run ends)."""
    share: float | None = None
    """productive / the sum of every cause: the run's wall time, less the pauses of a run that
    was stopped and resumed."""
    seconds: dict[str, float] = Field(default_factory=dict)
    """Seconds by cause (`Cause` values), every attempt so far."""
    ended: dict[str, float] = Field(default_factory=dict)
    """Seconds by cause of the attempts that ended: the current attempt's are added to these."""
    attempts: int = 0
    """The attempts folded into `ended` (1..attempts)."""
    restarts: int = 0
    """In-place restarts of the attempts in `ended`."""
    last: TrainerTimes | None = None
    """The current attempt's latest trainer report, kept: a trainer that is gone (its metrics with
    it) is still accounted for when its attempt ends."""

    def describe(self) -> str:
        """One line for `cptctl status`."""
        if self.share is None or self.since is None or self.until is None:
            return "goodput:     -"
        parts = ", ".join(f"{cause} {seconds:.0f} s" for cause, seconds in
                          sorted(self.seconds.items(), key=lambda kv: -kv[1]) if seconds >= 0.5)
        return f"goodput:     {self.share:.1%} of {sum(self.seconds.values()):.0f} s ({parts})"
