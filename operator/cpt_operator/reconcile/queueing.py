"""Kueue: the Admitted condition, and evictions, which resume from the last checkpoint once the
attempt is admitted again instead of counting as failures.
"""
from __future__ import annotations

from cpt_api.status import ConditionType, Phase, Reason
from ..policy.admission import Admission, condition as admission_condition
from .actions import StopAttempt
from .attempts import latest_in_lineage, must_wait
from .planner import Planner, set_condition
from .starts import start_spent


def was_evicted(p: Planner) -> bool:
    """The current attempt was evicted by Kueue (recorded in status, so that the pass that
    finds its Job gone does not take that for a failure)."""
    return any(c.type == ConditionType.admitted.value and c.reason == Reason.evicted.value
               for c in p.status.conditions)


def handle_eviction(p: Planner) -> None:
    """Kueue took the attempt's GPUs back. Its trainers got SIGTERM and write a last checkpoint;
    once its pods are gone a new attempt resumes from that checkpoint and queues again. Not a
    failure: no restart is counted."""
    st, attempt = p.status, p.obs.attempt
    if not was_evicted(p):
        st.evictions += 1
        found = attempt.admission or Admission("evicted", "Evicted")
        why = f"{found.reason}: {found.message}" if found.message else found.reason
        st.message = f"attempt {st.attempt} evicted by Kueue ({why}); it resumes from its last checkpoint " \
                     "once admitted again"
        set_condition(st, ConditionType.admitted, False, Reason.evicted.value, st.message, p.obs.now)
        p.emit("Warning", Reason.evicted.value, st.message)
        if start_spent(p, why):
            return
    if attempt.state == "running":
        # the Job goes (and its Workload with it): Kueue must not restart this attempt's pods
        # from its old restore point; the stop is repeated until the Job is gone
        p.actions.append(StopAttempt(attempt.number, "evicted by Kueue"))
        return
    if must_wait(p):
        return
    p.start(latest_in_lineage(p), f"resumed after eviction {st.evictions}")


def follow_admission(p: Planner) -> None:
    """The Admitted condition follows Kueue while the attempt that status names waits or runs."""
    found, st = p.obs.attempt.admission, p.status
    if found is None or found.state == "evicted" or was_evicted(p) or p.obs.attempt.number != st.attempt:
        return
    if st.phase not in (Phase.running, Phase.rolling_back):
        return
    value, reason, message = admission_condition(found, st.attempt)
    set_condition(st, ConditionType.admitted, value, reason, message, p.obs.now)
