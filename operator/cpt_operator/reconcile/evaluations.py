"""Separate evaluation (evaluation.placement: separate): what is owed, what to start while the run
goes on and to stop once it has ended, and the Evaluated condition.

Owed evaluations are computed before anything is decided, since a run is judged only once every
one is in, and the checkpoints they are owed for stay pinned until then.
"""
from __future__ import annotations

from cpt_api.evaluation import Placement
from cpt_api.manifest import attempt_of
from cpt_api.spec import CptRunSpec
from cpt_api.status import TERMINAL_PHASES, ConditionType, Reason
from ..policy.evaluations import plan_evaluations
from .actions import Evaluate, StopEvaluations
from .planner import Planner, set_condition


def _separate(spec: CptRunSpec) -> bool:
    return spec.evaluation is not None and spec.evaluation.placement == Placement.separate


def owed_evaluations(p: Planner) -> None:
    """What separate evaluation still owes, before anything is decided on what it measured."""
    if _separate(p.spec):
        p.evals = plan_evaluations(base_known=bool(p.status.base_metrics), checkpoints=p.obs.checkpoints,
                                   runs=p.obs.evaluations, concurrency=p.spec.evaluation.concurrency)  # type: ignore[union-attr]


def steer_evaluations(p: Planner) -> None:
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
    before = st.condition(ConditionType.evaluated)
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
