"""What a reconcile pass asks of its backend: the actions, and the Plan that carries them with the
new status.

Actions are plain data naming what should happen, never how: the local runner carries them out
with subprocesses and files, the operator with Jobs and patches. Backends apply them in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from cpt_api.spec import RestoreMode
from cpt_api.status import CptRunStatus, Overrides


@dataclass(frozen=True)
class StartAttempt:
    number: int
    restore_from: str | None
    """Checkpoint name to restore, or None for the base model."""
    restore_mode: RestoreMode
    overrides: Overrides
    reason: str
    base_sha256: str | None = None
    """The base's digest the run recorded: the trainer refuses a base whose bytes differ."""


@dataclass(frozen=True)
class StopAttempt:
    number: int
    reason: str
    checkpoint: bool = True
    """Let the trainer write a final checkpoint first. False for a rollback: what the attempt
    learnt since its last good checkpoint is being thrown away, so waiting for a save of it
    only delays the next attempt."""


@dataclass(frozen=True)
class Pin:
    """Everything the run may still restore; retention must keep it. First in a plan that has
    one: backends write it before they start an attempt, whose trainer may prune."""

    names: tuple[str, ...]
    judged: tuple[tuple[str, int], ...] = ()
    """(attempt folder, newest step seen) of every folder with checkpoints: retention deletes
    nothing newer, since the control plane has not yet weighed it (api.ownership.Pins)."""


@dataclass(frozen=True)
class Emit:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Sweep:
    """Delete every object and pod of these attempts (none of them is status.attempt)."""

    numbers: tuple[int, ...]


@dataclass(frozen=True)
class Evaluate:
    """Evaluate `target` (`base` or a checkpoint name) in a process or Job of its own, which
    writes its record into the folder of `attempt` (the checkpoint's; for the base, the
    current attempt's)."""

    target: str
    attempt: int


@dataclass(frozen=True)
class StopEvaluations:
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """The pods of a failed attempt go now, without their grace: a save needs every rank, so the
    survivors of a dead one cannot write a checkpoint, and a trainer stuck in a collective with it
    would hold its GPUs (and the next attempt) until the grace ended. The Job and the failed pod
    stay: their failure is what the run reports, and the pod's log is the user's."""

    number: int


ActionT = Union[StartAttempt, StopAttempt, Pin, Emit, Sweep, Evaluate, StopEvaluations, Release]


@dataclass(frozen=True)
class Plan:
    actions: tuple[ActionT, ...]
    status: CptRunStatus

    @property
    def starts(self) -> bool:
        """The plan starts an attempt: the start checks (`policy.start_checks`) come first."""
        return any(isinstance(a, StartAttempt) for a in self.actions)

    @property
    def prunes(self) -> bool:
        """The plan starts an attempt, or stops one whose trainer saves a last checkpoint: either
        trainer prunes the checkpoint root by the pins, so they must be written first."""
        return self.starts or any(isinstance(a, StopAttempt) and a.checkpoint for a in self.actions)
