"""One pass's working state: the status being rewritten and the actions gathered, with the few
steps every decision is made of (start an attempt, stop it, end the run, set a condition).

Every other module of the core decides through a Planner, so the bookkeeping that must go with
each step (goodput folded in once as an attempt ends, conditions moved together, an event for
each) is written once, here.
"""
from __future__ import annotations

from typing import Literal

from cpt_api.goodput import TrainerTimes
from cpt_api.manifest import attempt_of, step_of
from cpt_api.spec import CptRunSpec, RestoreMode
from cpt_api.status import Condition, ConditionType, CptRunStatus, Phase, Reason
from ..policy import goodput
from ..policy.evaluations import EvalPlan
from .actions import ActionT, Emit, StartAttempt, StopAttempt
from .observed import Observed


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


class Planner:
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
        if st.condition(ConditionType.started) is not None:  # the backend watches starts
            not_begun(self)
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
        goodput.close(st, self.obs.now, self.seen(), ending,
                      step_of(target) if target and attempt_of(target) == st.attempt else None)

    def seen(self) -> TrainerTimes | None:
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


def not_begun(p: Planner) -> None:
    """Started=False for a new attempt whose Job has not started (or is queued): here, since
    every start resets it; the rest of the Started condition lives in `starts`."""
    waits = " (it waits for Kueue to admit it)" if p.spec.resources.queue else ""
    set_condition(p.status, ConditionType.started, False, Reason.starting.value,
                  f"attempt {p.status.attempt}: its Job has not started yet{waits}", p.obs.now)
