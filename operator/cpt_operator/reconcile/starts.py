"""An attempt's start: the Started condition from its pods, and the start deadline
(resources.startTimeoutSeconds) that ends a run whose attempt cannot start.

A start that fails fails the same way on every restart (a missing image, an unschedulable pod),
so these end the run rather than spend restarts; time spent starting by attempts that Kueue
evicted before their trainers ran counts against the same deadline.
"""
from __future__ import annotations

from datetime import timezone

from cpt_api.status import ConditionType, Phase, Reason
from ..policy.start import Cause, deadline, instant, overdue
from .planner import Planner, not_begun, set_condition


def start_spent(p: Planner, why: str) -> bool:
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
    started = st.condition(ConditionType.started)
    last = f"; the last cause: {started.message}" if started is not None and started.message else ""
    p.finish(Phase.failed, Reason.start_timeout.value,
             f"attempts did not start within {timeout} s: {st.starting_seconds:.0f} s spent starting, "
             f"evicted by Kueue before their trainers ran (the last time: {why}){last}", checkpoint=False)
    return True


def _start_budget(p: Planner) -> int:
    """What is left of resources.startTimeoutSeconds for the current attempt."""
    return max(0, round(p.spec.resources.start_timeout_seconds - p.status.starting_seconds))


def _show_start(p: Planner) -> Cause | None:
    """The Started condition from how the attempt's start goes, with a Warning event when a
    fault appears; returns the cause while the attempt starts. Once Started is True for the
    attempt (reset by each new attempt) nothing is looked at again."""
    start, st = p.obs.attempt.start, p.status
    started = st.condition(ConditionType.started)
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
        not_begun(p)
        return None
    cause, by = start.cause, deadline(start, _start_budget(p))
    if cause.fault and (started is None or started.reason != cause.reason.value):
        p.emit("Warning", cause.reason.value, f"attempt {st.attempt}: {cause.describe()}")
    when = f" (start deadline {by.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ})" if by else ""
    set_condition(st, ConditionType.started, False, cause.reason.value,
                  f"attempt {st.attempt}: {cause.describe()}{when}", p.obs.now)
    return cause


def start_overdue(p: Planner) -> bool:
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


def start_failed(p: Planner) -> bool:
    """The attempt's Job failed before every trainer ran, of a fault (a container that could not
    start): the run fails without a restart. True when it ended the run."""
    cause = _show_start(p)
    if cause is None or not cause.fault:
        return False
    p.finish(Phase.failed, Reason.start_failed.value,
             f"attempt {p.status.attempt} failed before its trainers ran: {cause.describe()}")
    return True
