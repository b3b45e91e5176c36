"""What a backend observed of a run: the only input of the reconcile core besides spec and status.

Each backend fills these from its own sources (the local runner from torchrun subprocesses and
their event logs, the operator from Jobs, pods, Kueue and Prometheus); the core looks nowhere
else, which is what keeps it pure and lets both backends share it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from cpt_api.alerts import AlertRef
from cpt_api.goodput import TrainerTimes
from cpt_api.skips import DataSkip
from ..policy.admission import Admission
from ..policy.evaluations import EvalRun
from ..policy.start import Start
from ..policy.types import CheckpointEvals, EvalPoint


AttemptPhase = Literal["absent", "running", "succeeded", "failed", "stopped"]


@dataclass(frozen=True, kw_only=True)
class AttemptState:
    """What the backend sees of the attempt named in status.attempt."""

    number: int
    state: AttemptPhase
    message: str = ""
    step: int = 0
    tokens: int = 0
    refused: bool = False
    """The trainer refused its configuration (bad data path, tokenizer mismatch...): the same
    attempt would fail again, so no restart is spent on it."""
    admission: Admission | None = None
    """What Kueue says of the attempt's Job (resources.queue only)."""
    start: Start | None = None
    """How the attempt's start goes, from its pods (a cluster's backend; None where nothing is
    known of pods: the local backend, an attempt without a Job)."""
    times: TrainerTimes | None = None
    """The trainer's latest report of its own time (None before its first)."""


@dataclass(frozen=True, kw_only=True)
class Observed:
    attempt: AttemptState
    now: str
    """RFC 3339 time, for conditions and records."""
    base: Mapping[str, float] = field(default_factory=dict)
    """The base model's reference evaluation, once measured."""
    base_sha256: str | None = None
    """The base's digest as the first attempt that started verified it."""
    points: Sequence[EvalPoint] = ()
    anomalies: Mapping[str, int] = field(default_factory=dict)
    skips: Sequence[DataSkip] = ()
    """Data windows the current attempt's trainer blamed for its anomalies."""
    checkpoints: Sequence[CheckpointEvals] = ()
    """Usable checkpoints of the run, named `attempt-NNN/step-XXXXXXXX`."""
    stop_requested: bool = False
    rollback_to: str | None = None
    """A manual rollback request: a checkpoint name or `base`."""
    resume: bool = False
    """The user asked to continue a run that was stopped by an interrupt."""
    generation: int | None = None
    alerts: Sequence[AlertRef] = ()
    """Breaches an external alert (Alertmanager, a dashboard) reported, each bound to an attempt;
    acted on like a gate of the spec that fired, with that gate's action and adjustments."""
    pods_left: Sequence[int] = ()
    """Attempts, the current one included, some of whose pods have not terminated yet (a failed
    Job's other pods still shutting down, a stopped or swept attempt's pods in their grace)."""
    strays: Mapping[int, Sequence[str]] = field(default_factory=dict)
    """Attempts other than status.attempt whose objects still exist, with the kinds found: an
    older attempt's leftovers, or a newer one created by a pass that never recorded it."""
    evaluations: Mapping[str, EvalRun] = field(default_factory=dict)
    """evaluation.placement separate: the evaluations that run or failed, by target (`base` or a
    checkpoint name); one that ended with its record is absent."""
