"""The per-phase decision of a pass: which of the state machine's transitions (see the package's
docstring) the observations call for, in order of precedence.
"""
from __future__ import annotations

from cpt_api.spec import CptRunSpec, ModelFormat, RestoreMode
from cpt_api.status import TERMINAL_PHASES, ConditionType, Phase, Reason
from ..policy import decide
from ..policy.types import BASE, Action, Decision
from .actions import Release
from .attempts import latest_in_lineage, must_wait, restart_after_failure
from .decisions import apply_decision, external_breach, manual_rollback, observations_of
from .planner import Planner, set_condition
from .queueing import follow_admission, handle_eviction, was_evicted
from .starts import start_failed, start_overdue


def decide_phase(p: Planner) -> None:
    st, obs, spec = p.status, p.obs, p.spec
    if st.phase in TERMINAL_PHASES:
        if obs.resume and st.phase == Phase.stopped:
            if not must_wait(p):
                p.start(latest_in_lineage(p), "resumed")
        else:
            p.stop_attempt(f"run is {st.phase.value}")
        return
    # Precedence: a person's request (stop, then rollback) before anything automatic; alerts
    # seen in the same pass are dropped with it (the caller clears them), and an alert that
    # arrives later is bound to the attempt it was about, which the request has ended.
    if obs.stop_requested:
        p.finish(Phase.stopped, "StopRequested", "stopped on request")
    elif obs.rollback_to:
        manual_rollback(p, obs.rollback_to)
    elif st.phase == Phase.pending:
        if not must_wait(p):
            p.start(None, "first attempt")
    elif st.phase == Phase.rolling_back and obs.attempt.state != "running":
        if not must_wait(p):
            p.start(st.restore_from, f"after rollback {st.rollbacks}",
                    None if st.restore_from else _base_mode(spec))
    elif st.phase == Phase.rolling_back:
        # level-triggered: a stop lost between recording the rollback and carrying it out
        # (a crash, a restart) is issued again rather than waited on forever
        p.stop_attempt(f"rollback to {st.restore_from or BASE}", checkpoint=False)
    elif st.phase == Phase.running:
        # an alert about an attempt that already ended is dropped: the next one is judged afresh
        if not (obs.alerts and obs.attempt.state == "running" and external_breach(p, obs.alerts)):
            _running(p)
    follow_admission(p)


def _running(p: Planner) -> None:
    attempt = p.obs.attempt
    evicted = attempt.admission is not None and attempt.admission.state == "evicted"
    if (evicted or was_evicted(p)) and attempt.state != "succeeded":
        handle_eviction(p)
    elif attempt.state == "running":
        if not start_overdue(p):
            apply_decision(p, decide(p.spec, observations_of(p)))
    elif attempt.state == "succeeded" and not p.evals.done:
        # a late evaluation may still breach a gate: the run is judged once every one is in
        set_condition(p.status, ConditionType.progressing, True, Reason.evaluating.value,
                      f"the budget is reached; waiting for {len(p.evals.owed)} evaluation(s): "
                      f"{', '.join(p.evals.owed)}", p.obs.now)
    elif attempt.state == "succeeded":
        decision = decide(p.spec, observations_of(p, budget_reached=True))
        if decision.action == Action.cont:  # the policy had nothing against finishing
            decision = Decision(action=Action.finish, reasons=("budget reached",))
        apply_decision(p, decision)
    elif attempt.state == "stopped":
        p.status.phase, p.status.message = Phase.stopped, "interrupted; run again to resume"
        set_condition(p.status, ConditionType.progressing, False, "Interrupted", p.status.message, p.obs.now)
    elif attempt.refused:
        p.finish(Phase.failed, "Refused", f"attempt {attempt.number}: {attempt.message}")
    elif attempt.state == "failed" and start_failed(p):
        return
    elif must_wait(p):  # a failed Job's other pods are still stopping (its FailureTarget comes first)
        if attempt.state == "failed" and attempt.number in p.obs.pods_left:
            p.actions.append(Release(attempt.number))
        return
    else:  # failed, or gone without a trace (node loss, deleted Job)
        restart_after_failure(p, attempt.message or f"attempt {attempt.number} is {attempt.state}")


def _base_mode(spec: CptRunSpec) -> RestoreMode:
    # Returning to an hf/gguf base can only be weights-only: such a base has no optimizer state.
    if spec.base_model.format == ModelFormat.checkpoint:
        return spec.base_model.restore_mode
    return RestoreMode.weights_only
