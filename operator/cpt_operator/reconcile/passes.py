"""The two passes the backends call: `reconcile`, the full pass, and `reconcile_unreadable`, the
pass for a run whose storage may not be touched; and the Pin that heads a plan.
"""
from __future__ import annotations

from cpt_api.spec import CptRunSpec
from cpt_api.status import TERMINAL_PHASES, ConditionType, CptRunStatus, Phase, Reason
from ..policy import goodput
from ..policy.types import BASE
from .actions import Pin, Plan
from .attempts import sweep_strays
from .evaluations import owed_evaluations, steer_evaluations
from .observed import Observed
from .phases import decide_phase
from .planner import Planner, set_condition
from .starts import start_overdue
from .summaries import accept_spec, summarise


def reconcile(spec: CptRunSpec, status: CptRunStatus, obs: Observed) -> Plan:
    """One full pass. The order matters: the summaries and the evaluations owed are what the
    decision reads, and the evaluations to start or stop follow from the phase it leaves."""
    p = Planner(spec, status, obs)
    st = p.status
    st.observed_generation = obs.generation if obs.generation is not None else st.observed_generation
    accept_spec(p)
    summarise(p)
    sweep_strays(p)
    owed_evaluations(p)
    decide_phase(p)
    steer_evaluations(p)
    goodput.refresh(p.status, p.before, p.obs.now, p.seen())
    return _with_pins(p)


def reconcile_unreadable(spec: CptRunSpec, status: CptRunStatus, obs: Observed, problem: str,
                         reason: Reason = Reason.s3_secret_unreadable) -> Plan:
    """A pass of a running run whose storage may not be touched: the Secret in
    resources.s3SecretRef cannot be used (SpecValid=False, reason S3SecretUnreadable, `problem`
    naming it and why) or may not be (reason NotAllowed: its endpoint is outside the allow-list).
    Nothing that needs storage is decided (gates, restarts, the choice of a checkpoint, pins),
    but a stop request is carried out, and an attempt whose pods cannot start (lacking that very
    Secret, most likely) still fails at its start deadline rather than hold its GPUs."""
    p = Planner(spec, status, obs)
    st = p.status
    st.observed_generation = obs.generation if obs.generation is not None else st.observed_generation
    before = st.condition(ConditionType.spec_valid)
    if before is None or (before.status, before.reason, before.message) != \
            ("False", reason.value, problem):
        p.emit("Warning", reason.value, problem)
    set_condition(st, ConditionType.spec_valid, False, reason.value, problem, obs.now)
    if st.phase in TERMINAL_PHASES:
        p.stop_attempt(f"run is {st.phase.value}")
    elif obs.stop_requested:
        p.finish(Phase.stopped, "StopRequested", "stopped on request")
    elif st.phase == Phase.running and obs.attempt.state == "running":
        start_overdue(p)
    return Plan(tuple(p.actions), st)


def _with_pins(p: Planner) -> Plan:
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
