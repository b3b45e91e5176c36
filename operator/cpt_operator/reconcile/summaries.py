"""The status fields that restate what was observed: the base's metrics and digest, progress,
the checkpoints with their scores, the Pareto frontier and the chosen checkpoint; and SpecValid
with the recipe's warnings.

Recomputed on every pass from the observations, so the status shows the same whatever the
caller lost between passes.
"""
from __future__ import annotations

from cpt_api.status import CheckpointSummary, ConditionType, Reason
from ..policy import select_checkpoint
from ..policy.recipes import recipe_warnings
from .planner import Planner, set_condition


def summarise(p: Planner) -> None:
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


def accept_spec(p: Planner) -> None:
    """SpecValid=True, naming what of the recipe to reconsider; each new warning an event, once."""
    warnings = recipe_warnings(p.spec)
    message = "spec accepted" + (f"; to reconsider: {'; '.join(warnings)}" if warnings else "")
    before = p.status.condition(ConditionType.spec_valid)
    if warnings and (before is None or before.message != message):
        for warning in warnings:
            p.emit("Warning", Reason.recipe_warning.value, warning)
    set_condition(p.status, ConditionType.spec_valid, True, "Valid", message, p.obs.now)
