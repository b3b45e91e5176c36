"""Carrying out what the policy decided: rollback or tune to a checkpoint, stop, finish with the
chosen checkpoint; and the two other ways a rollback is asked for, a person's request and an
external alert, which take the same path as a gate that fired on observed metrics.

The policy (`cpt_operator.policy`) only decides; this module writes each decision into status
(history, overrides, conditions) and turns it into actions, so a decision is recorded before
anything is done about it.
"""
from __future__ import annotations

from typing import Sequence

from cpt_api.alerts import HANDLED_ALERTS_KEPT, AlertRef
from cpt_api.manifest import step_of
from cpt_api.status import ConditionType, Phase, Reason, RollbackRecord
from ..policy.alerts import due
from ..policy.decide import act, gate_trigger
from ..policy.types import BASE, Action, Decision, Observations
from .planner import Planner, set_condition


def observations_of(p: Planner, budget_reached: bool = False) -> Observations:
    return Observations(attempt=p.status.attempt, base=dict(p.status.base_metrics),
                        points=tuple(p.obs.points), anomalies=dict(p.obs.anomalies),
                        rollbacks=p.status.rollbacks, overrides=p.status.overrides,
                        budget_reached=budget_reached, skips=tuple(p.obs.skips),
                        start=p.status.restore_from or BASE, checkpoints=tuple(p.obs.checkpoints))


def _record_rollback(p: Planner, decision: Decision) -> None:
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


def apply_decision(p: Planner, decision: Decision) -> None:
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


def _finish_with_choice(p: Planner, why: str) -> None:
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


def manual_rollback(p: Planner, target: str) -> None:
    known = {c.name for c in p.obs.checkpoints}
    if target != BASE and target not in known:
        p.emit("Warning", "RollbackRefused", f"no usable checkpoint named {target!r}")
        return
    record = RollbackRecord(attempt=p.status.attempt, gate="manual", target=target,
                            overrides=p.status.overrides, reason="requested by a user")
    _record_rollback(p, Decision(action=Action.rollback, target=target, overrides=p.status.overrides,
                                 reasons=("manual rollback",), records=(record,)))


def external_breach(p: Planner, refs: Sequence[AlertRef]) -> bool:
    """Alerts name breached gates: the same path as gates that fired on observed metrics. Only
    the spec's gates act, each once, and only on the attempt the alert was about."""
    acting, dropped = due(refs, p.spec, p.status)
    for why in dropped:
        p.emit("Normal", "AlertDropped", why)
    if not acting:
        return False
    defined = {g.name: g for g in p.spec.gates}
    triggers = [gate_trigger(defined[r.gate], f"alert: gate {r.gate} breached")
                for r in sorted(acting, key=lambda r: r.gate)]
    observations = observations_of(p)
    base = Decision(action=Action.cont, overrides=observations.overrides,
                    reasons=tuple(t.reason for t in triggers))
    handled = [*p.status.handled_alerts, *(r.key for r in acting)]
    p.status.handled_alerts = handled[-HANDLED_ALERTS_KEPT:]
    apply_decision(p, act(p.spec, observations, triggers, base))
    return True
