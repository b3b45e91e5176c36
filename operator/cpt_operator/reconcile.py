"""The reconcile core: (spec, status, what is observed) -> Plan(actions, new status).

Pure and shared by both backends: the local runner observes torchrun subprocesses and their
event logs, the operator observes Jobs and Prometheus; each carries out the same actions its own
way. Running it twice on the same inputs gives the same plan, and every decision is written into
the status it returns, so a restart of the caller at any point loses nothing.

State machine (phase):
  Pending --start attempt 1--> Running
  Running --gate/anomaly: rollback|tune--> RollingBack --old attempt gone--> Running (attempt+1)
  Running --attempt failed--> Running (attempt+1 from its last checkpoint; bounded) | Failed
  Running --pods not started by the start deadline / failed before the trainer ran--> Failed
  Running --budget reached / plateau--> Succeeded (checkpoint chosen on the Pareto frontier)
  Running --stop requested--> Stopping --attempt gone--> Stopped
  Running --gate: stop / rollbacks exhausted--> Failed
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timezone
from typing import Literal, Mapping, Sequence, Union

from .api.alerts import HANDLED_ALERTS_KEPT, AlertRef
from .api.evaluation import Placement
from .api.goodput import TrainerTimes
from .api.manifest import attempt_folder, attempt_of, step_of
from .api.spec import CptRunSpec, ModelFormat, RestoreMode
from .api.trainer_config import TrainerConfig
from .api.status import (TERMINAL_PHASES, CheckpointSummary, Condition, ConditionType, CptRunStatus,
                         Overrides, Phase, Reason, RollbackRecord)
from .api.skips import DataSkip
from .policy import decide, select_checkpoint
from .policy.admission import Admission, condition as admission_condition
from .policy.alerts import due
from .policy.decide import Trigger, act
from .policy.evaluations import EvalPlan, EvalRun, plan_evaluations
from .policy import goodput
from .policy.recipes import recipe_warnings
from .policy.start import Cause, Start, deadline, instant, overdue
from .policy.types import BASE, Action, CheckpointEvals, Decision, EvalPoint, Observations

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


def set_condition(status: CptRunStatus, type_: ConditionType, value: bool, reason: str,
                  message: str, now: str) -> None:
    """Set one condition; its transition time moves only when its status flips."""
    wanted = "True" if value else "False"
    for cond in status.conditions:
        if cond.type == type_.value:
            if cond.status != wanted:
                cond.last_transition_time = now
            cond.status, cond.reason, cond.message = wanted, reason, message
            cond.observed_generation = status.observed_generation
            return
    status.conditions.append(Condition(type=type_.value, status=wanted, reason=reason,
                                       message=message, last_transition_time=now,
                                       observed_generation=status.observed_generation))


class _Planner:
    """Accumulates actions and status changes for one reconcile pass."""

    def __init__(self, spec: CptRunSpec, status: CptRunStatus, obs: Observed):
        self.spec, self.obs = spec, obs
        self.before = status
        """The status as the pass found it."""
        self.status = status.model_copy(deep=True)
        self.actions: list[ActionT] = []
        self.evals = EvalPlan()
        """Separate evaluations still owed (none with placement inline)."""

    def emit(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(Emit(type_, reason, message))

    def start(self, restore_from: str | None, reason: str, mode: RestoreMode | None = None) -> None:
        st = self.status
        self.close_attempt()
        goodput.begin(st, self.obs.now)
        st.attempt = st.attempts_seen = max(st.attempt, st.attempts_seen) + 1
        if mode is None:
            mode = RestoreMode.full_state if restore_from else self.spec.base_model.restore_mode
        st.restore_from, st.attempt_started_at, st.phase = restore_from, self.obs.now, Phase.running
        st.starting_since = None
        self.actions.append(StartAttempt(st.attempt, restore_from, mode, st.overrides, reason,
                                         st.base_sha256))
        origin = restore_from or "the base model"
        self.emit("Normal", "AttemptStarted", f"attempt {st.attempt} from {origin} ({reason})")
        set_condition(st, ConditionType.progressing, True, "AttemptRunning",
                      f"attempt {st.attempt} running from {origin}", self.obs.now)
        if _condition(st, ConditionType.started) is not None:  # the backend watches starts
            _not_begun(self)
        if self.spec.resources.queue:
            set_condition(st, ConditionType.admitted, False, Reason.queued.value,
                          f"attempt {st.attempt} waits for admission by LocalQueue {self.spec.resources.queue}",
                          self.obs.now)

    def stop_attempt(self, reason: str, checkpoint: bool = True) -> None:
        if self.obs.attempt.state == "running":
            self.actions.append(StopAttempt(self.status.attempt, reason, checkpoint))

    def close_attempt(self) -> None:
        """Fold the current attempt's time into the run's goodput, once, as it ends."""
        st = self.status
        target = st.restore_from if st.phase == Phase.rolling_back else None
        ending: goodput.Ending = "rollback" if st.phase == Phase.rolling_back else \
            "finished" if self.obs.attempt.state in ("running", "succeeded", "stopped") else "failed"
        goodput.close(st, self.obs.now, self._seen(), ending,
                      step_of(target) if target and attempt_of(target) == st.attempt else None)

    def _seen(self) -> TrainerTimes | None:
        """The trainer's report observed this pass, if it is the current attempt's."""
        return self.obs.attempt.times if self.obs.attempt.number == self.status.attempt else None

    def finish(self, phase: Phase, reason: str, message: str, checkpoint: bool = True) -> None:
        st = self.status
        self.close_attempt()
        st.phase, st.message = phase, message
        self.stop_attempt(message, checkpoint)
        set_condition(st, ConditionType.progressing, False, reason, message, self.obs.now)
        set_condition(st, ConditionType.ready, phase == Phase.succeeded, reason, message, self.obs.now)
        if phase == Phase.succeeded:
            set_condition(st, ConditionType.succeeded, True, reason, message, self.obs.now)
        elif phase == Phase.failed:
            set_condition(st, ConditionType.failed, True, reason, message, self.obs.now)
        self.emit("Normal" if phase == Phase.succeeded else "Warning", reason, message)


def _condition(status: CptRunStatus, type_: ConditionType) -> Condition | None:
    return status.condition(type_)


def _latest_in_lineage(p: _Planner) -> str | None:
    """Where a restarted attempt continues: the current attempt's newest checkpoint, else
    the point it started from."""
    prefix = f"{attempt_folder(p.status.attempt)}/"
    own = [c for c in p.obs.checkpoints if c.name.startswith(prefix)]
    if own:
        return max(own, key=lambda c: c.step).name
    return p.status.restore_from


def _observations(p: _Planner, budget_reached: bool = False) -> Observations:
    return Observations(attempt=p.status.attempt, base=dict(p.status.base_metrics),
                        points=tuple(p.obs.points), anomalies=dict(p.obs.anomalies),
                        rollbacks=p.status.rollbacks, overrides=p.status.overrides,
                        budget_reached=budget_reached, skips=tuple(p.obs.skips),
                        start=p.status.restore_from or BASE, checkpoints=tuple(p.obs.checkpoints))


def _record_rollback(p: _Planner, decision: Decision) -> None:
    st = p.status
    target = decision.target or BASE
    st.rollbacks += 1
    st.restore_from = None if target == BASE else target
    st.overrides = decision.overrides.model_copy(
        update={"rewarm_from": None if target == BASE else step_of(target)})
    for record in decision.records or (RollbackRecord(attempt=st.attempt, gate="policy", target=target,
                                                      overrides=decision.overrides),):
        st.history.append(record.model_copy(update={"time": p.obs.now}))
    st.phase = Phase.rolling_back
    why = "; ".join(decision.reasons) or "policy"
    st.message = f"rolling back to {target}: {why}"
    set_condition(st, ConditionType.gate_breached, True, "GateBreached", why, p.obs.now)
    set_condition(st, ConditionType.rolled_back, True, "RolledBack",
                  f"attempt {st.attempt} -> {target} (lr x{decision.overrides.lr_scale:g}, "
                  f"replay +{decision.overrides.replay_delta:g})", p.obs.now)
    p.stop_attempt(f"rollback to {target}", checkpoint=False)
    p.emit("Warning", "RollingBack", st.message)


def _apply(p: _Planner, decision: Decision) -> None:
    for warning in decision.warnings:
        p.emit("Warning", "PolicyWarning", warning)
    if decision.action in (Action.rollback, Action.tune):
        _record_rollback(p, decision)
    elif decision.action == Action.stop:
        phase = decision.phase or Phase.failed
        p.status.history.extend(r.model_copy(update={"time": p.obs.now}) for r in decision.records)
        p.finish(phase, "StopPolicy", "; ".join(decision.reasons) or "stopped by policy")
    elif decision.action == Action.finish:
        _finish_with_choice(p, "; ".join(decision.reasons) or "budget reached")


def _finish_with_choice(p: _Planner, why: str) -> None:
    """The run did what was asked (Succeeded) even when nothing beat the base; then no checkpoint
    is called chosen, and a warning event says so."""
    chosen = p.status.best_checkpoint
    if chosen == BASE:
        detail = p.status.verdict or "no checkpoint is better than the base"
        p.finish(Phase.succeeded, "Completed", f"{why}; no checkpoint is better than the base, so none is "
                 "chosen (bestCheckpoint: base)")
        p.emit("Warning", Reason.no_improvement.value, detail)
        return
    p.finish(Phase.succeeded, "Completed", f"{why}; chosen checkpoint: {chosen or 'none'}")


def _restart_after_failure(p: _Planner, message: str) -> None:
    st = p.status
    limit = p.spec.stop_policy.max_attempt_restarts
    if st.restarts >= limit:
        p.finish(Phase.failed, "AttemptFailed", f"attempt {st.attempt} failed ({message}); "
                 f"{st.restarts} restarts used of {limit}")
        return
    st.restarts += 1
    set_condition(st, ConditionType.degraded, True, "AttemptFailed", message, p.obs.now)
    p.start(_latest_in_lineage(p), f"restart {st.restarts}/{limit} after: {message}")


def _sweep(p: _Planner) -> None:
    """Objects of any attempt but the current one go, whatever the phase: an older attempt's
    leftovers, or a newer attempt whose start was never recorded in status (an operator killed
    between creating it and writing status), which a later start must not adopt as its own."""
    strays = p.obs.strays
    if not strays:
        return
    p.status.attempts_seen = max(p.status.attempts_seen, *strays)
    p.actions.append(Sweep(tuple(sorted(strays))))
    for number in sorted(strays):
        kinds = ", ".join(sorted(set(strays[number])))
        if number > p.status.attempt:
            p.emit("Warning", Reason.stray_swept.value, f"deleted attempt {number} ({kinds}): it was created "
                   f"but never recorded in status, whose attempt is {p.status.attempt}")
        else:
            p.emit("Normal", Reason.stray_swept.value, f"deleted what was left of attempt {number} ({kinds})")


def _must_wait(p: _Planner) -> bool:
    """True while another attempt could still hold pods (and GPUs): the next attempt starts only
    once they are gone, so at most one attempt's pods run at any time. Nothing is decided
    meanwhile; the pass that finds them gone decides afresh."""
    obs = p.obs
    busy = {*obs.pods_left, *obs.strays, *([obs.attempt.number] if obs.attempt.state == "running" else [])}
    if not busy:
        return False
    which = ", ".join(str(n) for n in sorted(busy))
    set_condition(p.status, ConditionType.progressing, True, Reason.waiting_for_pods.value,
                  f"the next attempt starts once the pods of attempt {which} are gone", obs.now)
    return True


def _was_evicted(p: _Planner) -> bool:
    """The current attempt was evicted by Kueue (recorded in status, so that the pass that
    finds its Job gone does not take that for a failure)."""
    return any(c.type == ConditionType.admitted.value and c.reason == Reason.evicted.value
               for c in p.status.conditions)


def _evicted(p: _Planner) -> None:
    """Kueue took the attempt's GPUs back. Its trainers got SIGTERM and write a last checkpoint;
    once its pods are gone a new attempt resumes from that checkpoint and queues again. Not a
    failure: no restart is counted."""
    st, attempt = p.status, p.obs.attempt
    if not _was_evicted(p):
        st.evictions += 1
        found = attempt.admission or Admission("evicted", "Evicted")
        why = f"{found.reason}: {found.message}" if found.message else found.reason
        st.message = f"attempt {st.attempt} evicted by Kueue ({why}); it resumes from its last checkpoint " \
                     "once admitted again"
        set_condition(st, ConditionType.admitted, False, Reason.evicted.value, st.message, p.obs.now)
        p.emit("Warning", Reason.evicted.value, st.message)
        if _start_spent(p, why):
            return
    if attempt.state == "running":
        # the Job goes (and its Workload with it): Kueue must not restart this attempt's pods
        # from its old restore point; the stop is repeated until the Job is gone
        p.actions.append(StopAttempt(attempt.number, "evicted by Kueue"))
        return
    if _must_wait(p):
        return
    p.start(_latest_in_lineage(p), f"resumed after eviction {st.evictions}")


def _start_spent(p: _Planner, why: str) -> bool:
    """An attempt evicted before its trainers all ran used up start time: add it to what earlier
    such attempts used, and end the run when nothing of resources.startTimeoutSeconds is left.
    True when it ended the run."""
    st = p.status
    if st.starting_since is None:
        return False  # it started (or never got a clock): a preemption, not a failed start
    st.starting_seconds += max(0.0, (instant(p.obs.now) - instant(st.starting_since)).total_seconds())
    st.starting_since = None
    timeout = p.spec.resources.start_timeout_seconds
    if st.starting_seconds < timeout:
        return False
    started = _condition(st, ConditionType.started)
    last = f"; the last cause: {started.message}" if started is not None and started.message else ""
    p.finish(Phase.failed, Reason.start_timeout.value,
             f"attempts did not start within {timeout} s: {st.starting_seconds:.0f} s spent starting, "
             f"evicted by Kueue before their trainers ran (the last time: {why}){last}", checkpoint=False)
    return True


def _start_budget(p: _Planner) -> int:
    """What is left of resources.startTimeoutSeconds for the current attempt."""
    return max(0, round(p.spec.resources.start_timeout_seconds - p.status.starting_seconds))


def _not_begun(p: _Planner) -> None:
    waits = " (it waits for Kueue to admit it)" if p.spec.resources.queue else ""
    set_condition(p.status, ConditionType.started, False, Reason.starting.value,
                  f"attempt {p.status.attempt}: its Job has not started yet{waits}", p.obs.now)


def _show_start(p: _Planner) -> Cause | None:
    """The Started condition from how the attempt's start goes, with a Warning event when a
    fault appears; returns the cause while the attempt starts. Once Started is True for the
    attempt (reset by each new attempt) nothing is looked at again."""
    start, st = p.obs.attempt.start, p.status
    started = _condition(st, ConditionType.started)
    if start is None or (started is not None and started.status == "True"):
        return None
    if start.state == "started":
        set_condition(st, ConditionType.started, True, Reason.trainers_running.value,
                      f"attempt {st.attempt}: every trainer is running", p.obs.now)
        st.starting_since, st.starting_seconds = None, 0.0
        return None
    if start.since is not None:
        st.starting_since = f"{start.since.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    if start.cause is None:  # queued: no clock yet
        _not_begun(p)
        return None
    cause, by = start.cause, deadline(start, _start_budget(p))
    if cause.fault and (started is None or started.reason != cause.reason.value):
        p.emit("Warning", cause.reason.value, f"attempt {st.attempt}: {cause.describe()}")
    when = f" (start deadline {by.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ})" if by else ""
    set_condition(st, ConditionType.started, False, cause.reason.value,
                  f"attempt {st.attempt}: {cause.describe()}{when}", p.obs.now)
    return cause


def _start_overdue(p: _Planner) -> bool:
    """The attempt did not start within resources.startTimeoutSeconds: its pods go at once (there
    is no trainer state to save) and the run fails, without a restart, which would fail the same
    way. True when it ended the run."""
    cause, start = _show_start(p), p.obs.attempt.start
    timeout, spent = p.spec.resources.start_timeout_seconds, p.status.starting_seconds
    if cause is None or start is None or not overdue(start, instant(p.obs.now), _start_budget(p)):
        return False
    earlier = f" ({spent:.0f} s of it spent by attempts Kueue evicted before their trainers ran)" if spent else ""
    p.finish(Phase.failed, Reason.start_timeout.value,
             f"attempt {p.status.attempt} did not start within {timeout} s{earlier}: {cause.describe()}",
             checkpoint=False)
    return True


def _start_failed(p: _Planner) -> bool:
    """The attempt's Job failed before every trainer ran, of a fault (a container that could not
    start): the run fails without a restart. True when it ended the run."""
    cause = _show_start(p)
    if cause is None or not cause.fault:
        return False
    p.finish(Phase.failed, Reason.start_failed.value,
             f"attempt {p.status.attempt} failed before its trainers ran: {cause.describe()}")
    return True


def _running(p: _Planner) -> None:
    attempt = p.obs.attempt
    evicted = attempt.admission is not None and attempt.admission.state == "evicted"
    if (evicted or _was_evicted(p)) and attempt.state != "succeeded":
        _evicted(p)
    elif attempt.state == "running":
        if not _start_overdue(p):
            _apply(p, decide(p.spec, _observations(p)))
    elif attempt.state == "succeeded" and not p.evals.done:
        # a late evaluation may still breach a gate: the run is judged once every one is in
        set_condition(p.status, ConditionType.progressing, True, Reason.evaluating.value,
                      f"the budget is reached; waiting for {len(p.evals.owed)} evaluation(s): "
                      f"{', '.join(p.evals.owed)}", p.obs.now)
    elif attempt.state == "succeeded":
        decision = decide(p.spec, _observations(p, budget_reached=True))
        if decision.action == Action.cont:  # the policy had nothing against finishing
            decision = Decision(action=Action.finish, reasons=("budget reached",))
        _apply(p, decision)
    elif attempt.state == "stopped":
        p.status.phase, p.status.message = Phase.stopped, "interrupted; run again to resume"
        set_condition(p.status, ConditionType.progressing, False, "Interrupted", p.status.message, p.obs.now)
    elif attempt.refused:
        p.finish(Phase.failed, "Refused", f"attempt {attempt.number}: {attempt.message}")
    elif attempt.state == "failed" and _start_failed(p):
        return
    elif _must_wait(p):  # a failed Job's other pods are still stopping (its FailureTarget comes first)
        if attempt.state == "failed" and attempt.number in p.obs.pods_left:
            p.actions.append(Release(attempt.number))
        return
    else:  # failed, or gone without a trace (node loss, deleted Job)
        _restart_after_failure(p, attempt.message or f"attempt {attempt.number} is {attempt.state}")


def _manual_rollback(p: _Planner, target: str) -> None:
    known = {c.name for c in p.obs.checkpoints}
    if target != BASE and target not in known:
        p.emit("Warning", "RollbackRefused", f"no usable checkpoint named {target!r}")
        return
    record = RollbackRecord(attempt=p.status.attempt, gate="manual", target=target,
                            overrides=p.status.overrides, reason="requested by a user")
    _record_rollback(p, Decision(action=Action.rollback, target=target, overrides=p.status.overrides,
                                 reasons=("manual rollback",), records=(record,)))


def _external_breach(p: _Planner, refs: Sequence[AlertRef]) -> bool:
    """Alerts name breached gates: the same path as gates that fired on observed metrics. Only
    the spec's gates act, each once, and only on the attempt the alert was about."""
    acting, dropped = due(refs, p.spec, p.status)
    for why in dropped:
        p.emit("Normal", "AlertDropped", why)
    if not acting:
        return False
    defined = {g.name: g for g in p.spec.gates}
    triggers = [Trigger(name=r.gate, action=Action(defined[r.gate].action.value), tune=defined[r.gate].tune,
                        to_base=defined[r.gate].rollback_to.value == BASE, reason=f"alert: gate {r.gate} breached")
                for r in sorted(acting, key=lambda r: r.gate)]
    observations = _observations(p)
    base = Decision(action=Action.cont, overrides=observations.overrides,
                    reasons=tuple(t.reason for t in triggers))
    handled = [*p.status.handled_alerts, *(r.key for r in acting)]
    p.status.handled_alerts = handled[-HANDLED_ALERTS_KEPT:]
    _apply(p, act(p.spec, observations, triggers, base))
    return True


def _summaries(p: _Planner) -> None:
    st, obs = p.status, p.obs
    if obs.base and not st.base_metrics:
        st.base_metrics = dict(obs.base)
    if obs.base_sha256 and not st.base_sha256:
        st.base_sha256 = obs.base_sha256
    if obs.attempt.number == st.attempt and obs.attempt.state != "absent":
        st.step, st.tokens = obs.attempt.step or st.step, obs.attempt.tokens or st.tokens
    if not obs.checkpoints:
        return
    st.attempts_seen = max(st.attempts_seen, *(c.attempt for c in obs.checkpoints))
    selection = select_checkpoint(p.spec, st.base_metrics, list(obs.checkpoints))
    st.frontier, st.best_checkpoint = list(selection.frontier), selection.chosen
    if selection.verdict is not None:
        improved = selection.verdict.improved
        set_condition(st, ConditionType.improved, improved,
                      (Reason.better_than_base if improved else Reason.no_improvement).value,
                      selection.verdict.message, obs.now)
    st.last_checkpoint = max(obs.checkpoints, key=lambda c: (c.attempt, c.step)).name
    passing = [c for c in obs.checkpoints if selection.passed.get(c.name)]
    st.last_good_checkpoint = max(passing, key=lambda c: (c.attempt, c.step)).name if passing else None
    st.checkpoints = [CheckpointSummary(name=c.name, step=c.step, tokens=c.tokens, metrics=dict(c.evals),
                                        passed_gates=selection.passed.get(c.name),
                                        on_frontier=c.name in selection.frontier,
                                        score=selection.scores.get(c.name))
                      for c in obs.checkpoints]


def _admission(p: _Planner) -> None:
    """The Admitted condition follows Kueue while the attempt that status names waits or runs."""
    found, st = p.obs.attempt.admission, p.status
    if found is None or found.state == "evicted" or _was_evicted(p) or p.obs.attempt.number != st.attempt:
        return
    if st.phase not in (Phase.running, Phase.rolling_back):
        return
    value, reason, message = admission_condition(found, st.attempt)
    set_condition(st, ConditionType.admitted, value, reason, message, p.obs.now)


def _separate(spec: CptRunSpec) -> bool:
    return spec.evaluation is not None and spec.evaluation.placement == Placement.separate


def _owed_evaluations(p: _Planner) -> None:
    """What separate evaluation still owes, before anything is decided on what it measured."""
    if _separate(p.spec):
        p.evals = plan_evaluations(base_known=bool(p.status.base_metrics), checkpoints=p.obs.checkpoints,
                                   runs=p.obs.evaluations, concurrency=p.spec.evaluation.concurrency)  # type: ignore[union-attr]


def _evaluations(p: _Planner) -> None:
    """Start what is owed while the run goes on, stop what runs once it has ended; the
    Evaluated condition says where it stands."""
    st, obs, plan = p.status, p.obs, p.evals
    active = st.phase not in TERMINAL_PHASES and _separate(p.spec)
    running = tuple(sorted(t for t, r in obs.evaluations.items() if r.state == "running"))
    if running and not active:
        p.actions.append(StopEvaluations(running))
    if not _separate(p.spec):
        return
    for target in plan.start if active else ():
        p.actions.append(Evaluate(target, attempt_of(target) or max(st.attempt, 1)))
    before = _condition(st, ConditionType.evaluated)
    if plan.failed:
        text = "; ".join(f"{t}: {why or 'failed'}" for t, why in plan.failed)
        message = f"evaluation failed after its retries (left unjudged, never chosen): {text}"
        if before is None or before.message != message:
            p.emit("Warning", Reason.evaluation_failed.value, message)
        set_condition(st, ConditionType.evaluated, False, Reason.evaluation_failed.value, message, obs.now)
    elif plan.owed:
        set_condition(st, ConditionType.evaluated, False, Reason.evaluating.value,
                      f"{len(plan.owed)} owed, oldest first: {', '.join(plan.owed[:5])}", obs.now)
    else:
        set_condition(st, ConditionType.evaluated, True, "Evaluated",
                      "the base and every checkpoint are evaluated", obs.now)


def _accepted(p: _Planner) -> None:
    """SpecValid=True, naming what of the recipe to reconsider; each new warning an event, once."""
    warnings = recipe_warnings(p.spec)
    message = "spec accepted" + (f"; to reconsider: {'; '.join(warnings)}" if warnings else "")
    before = _condition(p.status, ConditionType.spec_valid)
    if warnings and (before is None or before.message != message):
        for warning in warnings:
            p.emit("Warning", Reason.recipe_warning.value, warning)
    set_condition(p.status, ConditionType.spec_valid, True, "Valid", message, p.obs.now)


def reconcile(spec: CptRunSpec, status: CptRunStatus, obs: Observed) -> Plan:
    p = _Planner(spec, status, obs)
    st = p.status
    st.observed_generation = obs.generation if obs.generation is not None else st.observed_generation
    _accepted(p)
    _summaries(p)
    _sweep(p)
    _owed_evaluations(p)
    _decide(p)
    _evaluations(p)
    goodput.refresh(p.status, p.before, p.obs.now, p._seen())
    return _plan(p)


def _decide(p: _Planner) -> None:
    st, obs, spec = p.status, p.obs, p.spec
    if st.phase in TERMINAL_PHASES:
        if obs.resume and st.phase == Phase.stopped:
            if not _must_wait(p):
                p.start(_latest_in_lineage(p), "resumed")
        else:
            p.stop_attempt(f"run is {st.phase.value}")
        return
    # Precedence: a person's request (stop, then rollback) before anything automatic; alerts
    # seen in the same pass are dropped with it (the caller clears them), and an alert that
    # arrives later is bound to the attempt it was about, which the request has ended.
    if obs.stop_requested:
        p.finish(Phase.stopped, "StopRequested", "stopped on request")
    elif obs.rollback_to:
        _manual_rollback(p, obs.rollback_to)
    elif st.phase == Phase.pending:
        if not _must_wait(p):
            p.start(None, "first attempt")
    elif st.phase == Phase.rolling_back and obs.attempt.state != "running":
        if not _must_wait(p):
            p.start(st.restore_from, f"after rollback {st.rollbacks}",
                    None if st.restore_from else _base_mode(spec))
    elif st.phase == Phase.rolling_back:
        # level-triggered: a stop lost between recording the rollback and carrying it out
        # (a crash, a restart) is issued again rather than waited on forever
        p.stop_attempt(f"rollback to {st.restore_from or BASE}", checkpoint=False)
    elif st.phase == Phase.running:
        # an alert about an attempt that already ended is dropped: the next one is judged afresh
        if not (obs.alerts and obs.attempt.state == "running" and _external_breach(p, obs.alerts)):
            _running(p)
    _admission(p)


def reconcile_unreadable(spec: CptRunSpec, status: CptRunStatus, obs: Observed, problem: str,
                         reason: Reason = Reason.s3_secret_unreadable) -> Plan:
    """A pass of a running run whose storage may not be touched: the Secret in
    resources.s3SecretRef cannot be used (SpecValid=False, reason S3SecretUnreadable, `problem`
    naming it and why) or may not be (reason NotAllowed: its endpoint is outside the allow-list).
    Nothing that needs storage is decided (gates, restarts, the choice of a checkpoint, pins),
    but a stop request is carried out, and an attempt whose pods cannot start (lacking that very
    Secret, most likely) still fails at its start deadline rather than hold its GPUs."""
    p = _Planner(spec, status, obs)
    st = p.status
    st.observed_generation = obs.generation if obs.generation is not None else st.observed_generation
    before = _condition(st, ConditionType.spec_valid)
    if before is None or (before.status, before.reason, before.message) != \
            ("False", reason.value, problem):
        p.emit("Warning", reason.value, problem)
    set_condition(st, ConditionType.spec_valid, False, reason.value, problem, obs.now)
    if st.phase in TERMINAL_PHASES:
        p.stop_attempt(f"run is {st.phase.value}")
    elif obs.stop_requested:
        p.finish(Phase.stopped, "StopRequested", "stopped on request")
    elif st.phase == Phase.running and obs.attempt.state == "running":
        _start_overdue(p)
    return Plan(tuple(p.actions), st)


def _plan(p: _Planner) -> Plan:
    """The pass's actions behind the pins, computed from the final status so that a restore
    point chosen in this very pass (rollback, restart, resume) is already among them."""
    st = p.status
    # a checkpoint owed its evaluation is kept until it is judged
    names = {*st.frontier, st.last_good_checkpoint, st.best_checkpoint, st.restore_from, *p.evals.owed}
    pins = tuple(sorted(n for n in names if n and n != BASE))
    judged: dict[str, int] = {}
    for c in p.obs.checkpoints:
        folder = c.name.split("/", 1)[0]
        judged[folder] = max(judged.get(folder, -1), c.step)
    pin = Pin(pins, tuple(sorted(judged.items())))
    return Plan(((pin,) if pins or judged else ()) + tuple(p.actions), st)


def _base_mode(spec: CptRunSpec) -> RestoreMode:
    # Returning to an hf/gguf base can only be weights-only: such a base has no optimizer state.
    if spec.base_model.format == ModelFormat.checkpoint:
        return spec.base_model.restore_mode
    return RestoreMode.weights_only


def attempt_config(action: StartAttempt, *, spec: CptRunSpec, run: str, run_uid: str | None,
                   checkpoint_root: str, run_dir: str, namespace: str = "local",
                   metrics_port: int = 0, image: str | None = None) -> TrainerConfig:
    """What the trainer of the attempt `action` starts runs with, for either backend (which
    decides only where things are: the run directory, the checkpoint root, the metrics port)."""
    root = checkpoint_root.rstrip("/")
    return TrainerConfig(run=run, namespace=namespace, attempt=action.number, spec=spec, run_dir=run_dir,
                         run_uid=run_uid, checkpoint_root=root,
                         checkpoint_uri=f"{root}/{attempt_folder(action.number)}",
                         restore_from=f"{root}/{action.restore_from}" if action.restore_from else None,
                         restore_mode=action.restore_mode, overrides=action.overrides,
                         base_sha256=action.base_sha256, metrics_port=metrics_port, image=image)


def evaluation_config(action: Evaluate, *, spec: CptRunSpec, run: str, run_uid: str | None,
                      checkpoint_root: str, run_dir: str, namespace: str = "local",
                      image: str | None = None) -> TrainerConfig:
    """What the separate evaluation `action` runs with, for either backend: the run's spec, and
    the folder of the attempt whose checkpoint it reads and where its record goes."""
    root = checkpoint_root.rstrip("/")
    return TrainerConfig(run=run, namespace=namespace, attempt=action.attempt, spec=spec, run_dir=run_dir,
                         run_uid=run_uid, checkpoint_root=root,
                         checkpoint_uri=f"{root}/{attempt_folder(action.attempt)}", image=image)


def evaluation_target(action: Evaluate) -> str:
    """The evaluator's `--evaluate` argument: `base`, or the checkpoint's name in its attempt folder."""
    return action.target.rsplit("/", 1)[-1]

