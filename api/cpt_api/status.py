"""CptRun status, following the Kubernetes API conventions (phase + conditions).

Every field here is declared in the CRD's status schema: a structural schema prunes anything
undeclared, so a status field that is not in this model would silently vanish on a cluster.
"""
from __future__ import annotations

from enum import Enum

from pydantic import Field

from .base import SpecModel
from .goodput import Goodput
from .skips import DataSkip


BASE = "base"
"""Names the immutable base model where a checkpoint name could stand: a rollback or restore
target, and `bestCheckpoint` when no checkpoint is better than the base."""


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    rolling_back = "RollingBack"
    stopping = "Stopping"
    succeeded = "Succeeded"
    failed = "Failed"
    stopped = "Stopped"


TERMINAL_PHASES = {Phase.succeeded, Phase.failed, Phase.stopped}


class ConditionType(str, Enum):
    ready = "Ready"
    progressing = "Progressing"
    degraded = "Degraded"
    gate_breached = "GateBreached"
    rolled_back = "RolledBack"
    succeeded = "Succeeded"
    failed = "Failed"
    spec_valid = "SpecValid"
    memory_planned = "MemoryPlanned"
    """True when the memory planner checked the run against `resources.gpuMemory` and
    `resources.memory` (those the spec sets) and it fits; False (reason PlanUnavailable) when the
    base's shape could not be read: the run goes on."""
    admitted = "Admitted"
    """With resources.queue: True once Kueue admitted the attempt's gang; False while it waits
    (Kueue's reason and message) or after an eviction (reason Evicted)."""
    checkpoints_pinned = "CheckpointsPinned"
    """False (reason PinFailed) while what the run may still restore could not be pinned at the
    checkpoint root: retried every pass, and no attempt starts meanwhile."""
    improved = "Improved"
    """Whether the run has a checkpoint better than the base (reason BetterThanBase) or not
    (NoImprovement: the base is the choice; the message gives the domain gain per token of the
    closest checkpoint and the gate or axis that held it back). Absent until a checkpoint has been
    judged against the base."""
    evaluated = "Evaluated"
    """evaluation.placement separate: True (reason Evaluated) once the base and every checkpoint
    have their evaluation; False while some are owed (reason Evaluating, the message counting
    them) or one failed after its retries (reason EvaluationFailed, naming it and why: that
    checkpoint stays unjudged, never chosen)."""
    started = "Started"
    """On a cluster: False while the attempt's pods start, its reason saying what holds one back
    (one of `START_CAUSES`, else Starting) and its message the pod and what the kubelet or the
    scheduler said; True (reason TrainersRunning) once every pod's trainer runs. Reset to False at
    each new attempt."""


class Reason(str, Enum):
    """Condition and event reasons that people and scripts match on: a contract, kept here."""

    invalid_spec = "InvalidSpec"
    wont_fit = "WontFit"
    """The planned per-GPU memory exceeds `resources.gpuMemory`, or a pod's planned host memory
    `resources.memory`; the message names which, and the fix."""
    fits = "Fits"
    plan_unavailable = "PlanUnavailable"
    better_than_base = "BetterThanBase"
    """Improved=True: the chosen checkpoint beats the base (on the Pareto frontier with it, J > 0)."""
    no_improvement = "NoImprovement"
    """Improved=False, and an event when the run ends so: no checkpoint that passes every gate is
    better than the base, so the base is the run's choice (`bestCheckpoint: base`)."""
    create_forbidden = "CreateForbidden"
    """Progressing=False: the API server refused an attempt's object for now (403: a full
    ResourceQuota, an admission webhook or policy, missing permissions); the start is tried again
    with doubling delays, and the message quotes the API server."""
    invalid_object = "InvalidObject"
    """The API server refused an object of the attempt (a bad quantity, an oversized config):
    not retried until the spec changes; the message is the API server's."""
    waiting_for_pods = "WaitingForPods"
    """Progressing: the next attempt waits until another attempt's pods are gone."""
    stray_swept = "StrayAttemptSwept"
    """Event: objects of an attempt other than status.attempt were deleted."""
    checkpoint_uri_in_use = "CheckpointUriInUse"
    """checkpoint.uri holds another run's checkpoints (its run.json names that run); not started."""
    pin_failed = "PinFailed"
    pinned = "Pinned"
    kueue_not_installed = "KueueNotInstalled"
    """resources.queue is set but the cluster has no Kueue (no Workload API): not started."""
    queued = "Queued"
    """Admitted=False: the attempt's Job waits for Kueue (no Workload yet)."""
    evicted = "Evicted"
    """Admitted=False: Kueue evicted the attempt (preempted, pods not ready in time); the run
    resumes from its last checkpoint once admitted again, and no restart is counted."""
    s3_secret_unreadable = "S3SecretUnreadable"
    """The Secret in resources.s3SecretRef cannot be read or lacks a key: the run's storage is not
    touched with any other identity, and no attempt starts; the message names the Secret and why."""
    not_allowed = "NotAllowed"
    """The run leaves its platform team's allow-lists (chart values `tenancy`: images, Secrets,
    pools, tolerations, S3 endpoints); the message names the field and what is allowed. Not
    started; a running run's storage is not touched."""
    starting = "Starting"
    """Started=False: the attempt's pods are on their way (queued, scheduled, pulling, creating)."""
    trainers_running = "TrainersRunning"
    """Started=True: every pod of the attempt runs its trainer."""
    image_pull_failed = "ImagePullFailed"
    """Started=False: the kubelet cannot get the image (ErrImagePull, ImagePullBackOff,
    ErrImageNeverPull, InvalidImageName...): a wrong `resources.image`, a missing pull secret."""
    container_config_error = "ContainerConfigError"
    """Started=False: the kubelet cannot build the container's config (CreateContainerConfigError):
    a Secret or ConfigMap it names, or a key of one, is missing."""
    container_create_failed = "ContainerCreateFailed"
    """Started=False: the runtime refused to create the container (CreateContainerError)."""
    container_run_failed = "ContainerRunFailed"
    """Started=False: the container was created but did not run (RunContainerError, or ended with
    StartError: e.g. its command is not in the image)."""
    unschedulable = "Unschedulable"
    """Started=False: the scheduler finds no node for a pod (too few free GPUs, no node matching
    `resources.nodeSelector`, an untolerated taint); its message says which."""
    start_timeout = "StartTimeout"
    """Failed: the attempt's pods did not all run their trainer within
    `resources.startTimeoutSeconds`; the Job was deleted (its GPUs freed) and no restart spent."""
    evaluating = "Evaluating"
    """Evaluated=False while separate evaluations are owed; Progressing while a finished
    attempt's last checkpoints are still being evaluated (the run ends once they are judged)."""
    evaluation_failed = "EvaluationFailed"
    """Evaluated=False, and a Warning event: a checkpoint's (or the base's) separate evaluation
    failed after its retries."""
    recipe_warning = "RecipeWarning"
    """Event, once per warning: a weights-only start without warm-up or replay, or with an LR above
    typical pretraining peaks (`policy.recipes`); also in SpecValid's message."""
    start_failed = "StartFailed"
    """Failed: the attempt's Job failed before every trainer ran (a container that could not
    start): a restart would fail the same way, so none is spent."""


START_CAUSES = (Reason.image_pull_failed, Reason.container_config_error, Reason.container_create_failed,
                Reason.container_run_failed, Reason.unschedulable)
"""Started=False reasons that name a fault (each posts a Warning event when it appears), most
telling first: what the user must fix before anything else can help."""


class Condition(SpecModel):
    type: str
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Overrides(SpecModel):
    """What the control plane changed for an attempt relative to the spec."""

    lr_scale: float = 1.0
    replay_delta: float = 0.0
    skips: list[DataSkip] = Field(default_factory=list)
    """Data windows every later attempt skips: they made training spike (`api.skips`)."""
    rewarm_from: int | None = None
    """The step of the checkpoint a rollback (or tune) went back to: from there the LR warms up
    again over `schedule.rewarmSteps` instead of resuming mid-schedule at full strength (the
    restored optimizer moments were fitted to another LR). None after a return to the base,
    which warms up from step 0 anyway."""


class RollbackRecord(SpecModel):
    attempt: int
    """The attempt that breached."""
    gate: str
    """Gate or anomaly rule that fired."""
    metric: str = ""
    value: float | None = None
    baseline: float | None = None
    target: str
    """Checkpoint (or 'base') the next attempt restores from."""
    overrides: Overrides = Field(default_factory=Overrides)
    time: str | None = None
    reason: str = ""


class CheckpointSummary(SpecModel):
    name: str
    step: int
    tokens: int = 0
    uri: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    passed_gates: bool | None = None
    on_frontier: bool = False
    score: float | None = None


class CptRunStatus(SpecModel):
    phase: Phase = Phase.pending
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    attempt: int = 0
    attempt_started_at: str | None = None
    attempts_seen: int = 0
    """The highest attempt number any object or checkpoint of the run has carried, attempts that
    were swept before status recorded them included: the next attempt is numbered above it, so an
    attempt's folder of checkpoints is never reused."""
    restore_from: str | None = None
    overrides: Overrides = Field(default_factory=Overrides)
    step: int = 0
    tokens: int = 0
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    last_good_checkpoint: str | None = None
    rollbacks: int = 0
    restarts: int = 0
    in_place_restarts: int = 0
    """Trainers restarted inside their attempt (torchrun `--max-restarts`, up to
    stopPolicy.maxInPlaceRestarts an attempt): no new attempt, no restart counted."""
    goodput: Goodput = Field(default_factory=Goodput)
    """Where the run's wall time went, by cause, and the productive share (`api.goodput`)."""
    evictions: int = 0
    """Attempts Kueue evicted (preempted, pods not ready in time): resumed, never counted as
    restarts against stopPolicy.maxAttemptRestarts."""
    starting_since: str | None = None
    """When the current attempt's start clock began (its Job's startTime), while its trainers do
    not all run yet: kept here because a Job Kueue evicts loses its startTime."""
    starting_seconds: float = 0.0
    """Seconds that earlier attempts spent starting before Kueue evicted them with trainers still
    not running (an image that cannot be pulled, pods never ready). They count against
    resources.startTimeoutSeconds of the attempts that follow, so a start that keeps failing ends
    the run (StartTimeout) instead of queueing forever; 0 again once an attempt's trainers run."""
    history: list[RollbackRecord] = Field(default_factory=list)
    base_metrics: dict[str, float] = Field(default_factory=dict)
    """The base model's reference evaluation (`suite.metric` -> value), measured once."""
    base_sha256: str | None = None
    """Digest of the base's bytes, recorded at the first start; every later attempt refuses a
    base whose bytes differ (the base is immutable)."""
    frontier: list[str] = Field(default_factory=list)
    checkpoints: list[CheckpointSummary] = Field(default_factory=list)
    handled_alerts: list[str] = Field(default_factory=list)
    """Keys of the alerts that acted, newest last (a bounded few): Alertmanager re-sends a firing
    alert, and the same breach must not act twice."""
    message: str = ""

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_.value), None)

    @property
    def improved(self) -> bool | None:
        """The Improved condition as a value: None until a checkpoint was judged against the base."""
        found = self.condition(ConditionType.improved)
        return None if found is None else found.status == "True"

    @property
    def verdict(self) -> str:
        """The Improved condition's message: how the run stands against its base ("" before)."""
        found = self.condition(ConditionType.improved)
        return found.message if found is not None else ""

    def describe(self, run: str) -> str:
        """What `cptctl status` prints, the same for a local run and a cluster run."""
        o = self.overrides
        lines = [
            f"run:         {run}",
            f"phase:       {self.phase.value}  {self.message}",
            f"attempt:     {self.attempt} (from {self.restore_from or 'base'}; lr x{o.lr_scale:g}, "
            f"replay +{o.replay_delta:g})",
            f"progress:    step {self.step}, {self.tokens:,} tokens",
            f"checkpoints: last {self.last_checkpoint or '-'}, last good {self.last_good_checkpoint or '-'}, "
            f"chosen {self.best_checkpoint or '-'}"
            + (" (no checkpoint is better than the base)" if self.best_checkpoint == BASE else ""),
            f"rollbacks:   {self.rollbacks}, restarts: {self.restarts} (in place: {self.in_place_restarts}), "
            f"evictions: {self.evictions}",
            self.goodput.describe(),
        ]
        for rec in self.history:
            value = f" {rec.metric}={rec.value:.4g} (baseline {rec.baseline:.4g})" \
                if rec.value is not None and rec.baseline is not None else ""
            lines.append(f"  - attempt {rec.attempt}: {rec.gate}{value} -> {rec.target}; {rec.reason}")
        lines += [f"  {c.type}={c.status} ({c.reason}) {c.message}" for c in self.conditions]
        return "\n".join(lines)
