"""`decide`: one decision from everything observed so far.

Order of precedence (the first that applies wins):

1. A fired gate or anomaly rule whose action is `stop` → stop (phase Stopped).
2. Fired gates / anomaly rules asking for `rollback` or `tune`:
   * rollbacks already spent (`stopPolicy.maxRollbacks`) → stop (phase Failed);
   * any `rollback` → rollback to `base` if one of them says so, else to `lastGood`; an
     anomaly rollback alone goes to the last stable checkpoint before the spike and skips
     the data windows the trainer blamed (`anomaly.py`);
   * only `tune` → restart from the newest checkpoint without rewinding;
   both with adjusted overrides (`rollback.adjust`) and one RollbackRecord per cause.
   Gates come before the budget: a run that ends breaching a gate gets another chance.
3. Budget reached → finish (phase Succeeded; the caller selects a checkpoint).
4. Plateau of the domain metric, or no domain gain over the base (`stopPolicy.noImprovement`)
   → finish.
5. Otherwise continue; breaches still inside their hysteresis are listed as reasons.

The function is pure and idempotent: the same spec and observations give the same decision;
record times are left for the caller to stamp.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from cpt_api.evaluation import GateSpec, RollbackTarget, TuneSpec
from cpt_api.skips import merge_skips
from cpt_api.spec import CptRunSpec
from cpt_api.status import Overrides, Phase, RollbackRecord
from .anomaly import (ANOMALY_TUNE, AnomalyFinding, anomaly_findings, anomaly_notes,
                      anomaly_target, anomaly_tune)
from .gates import judge_gates
from .rollback import adjust, last_good, newest_checkpoint
from .stop import no_improvement_reason, plateau_reason, rollbacks_exhausted
from .types import BASE, Action, Decision, GateOutcome, Observations, ordered


@dataclass(frozen=True, kw_only=True)
class Trigger:
    """A fired gate or anomaly rule, in one shape."""

    name: str
    action: Action
    tune: TuneSpec
    to_base: bool
    metric: str = ""
    value: float | None = None
    baseline: float | None = None
    reason: str
    anomaly: bool = False
    """An anomaly-restores rollback: it restarts before the spike (`anomaly_target`)."""


def decide(spec: CptRunSpec, obs: Observations) -> Decision:
    history = ordered(obs.points)
    outcomes, warnings = judge_gates(spec, obs.base, history, obs.attempt)
    breached = tuple(o for o in outcomes if o.breached)
    findings = anomaly_findings(spec, obs.anomalies, obs.skips)
    reasons = [o.describe() for o in breached] + [f.reason for f in findings]
    triggers = gate_triggers(spec, outcomes) + [anomaly_trigger(f, obs) for f in findings]
    base = Decision(action=Action.cont, reasons=tuple(reasons + anomaly_notes(obs.anomalies)),
                    breached=breached, overrides=obs.overrides, warnings=tuple(warnings))
    if triggers:
        return act(spec, obs, triggers, base)
    return finish_or_continue(spec, obs, base)


def gate_trigger(gate: GateSpec, reason: str, metric: str = "", value: float | None = None,
                 baseline: float | None = None) -> Trigger:
    """A gate that fired, on the metrics observed or by an alert: acted on as the spec says."""
    return Trigger(name=gate.name, action=Action(gate.action.value), tune=gate.tune,
                   to_base=gate.rollback_to == RollbackTarget.base, metric=metric, value=value,
                   baseline=baseline, reason=reason)


def gate_triggers(spec: CptRunSpec, outcomes: Sequence[GateOutcome]) -> list[Trigger]:
    gates: dict[str, GateSpec] = {g.name: g for g in spec.gates}
    return [gate_trigger(gates[o.gate], o.describe(), o.metric, o.value, o.baseline)
            for o in outcomes if o.fired]


def anomaly_trigger(finding: AnomalyFinding, obs: Observations) -> Trigger:
    # Restores are where the trainer blames data; a non-finite step keeps the gates' target.
    restores = finding.rule == "anomaly-restores"
    tune = anomaly_tune(finding.count, obs.skips, obs.overrides.skips) if restores else ANOMALY_TUNE
    return Trigger(name=finding.rule, action=finding.action, tune=tune, to_base=False,
                   metric=finding.rule, value=float(finding.count), reason=finding.reason,
                   anomaly=restores)


def act(spec: CptRunSpec, obs: Observations, triggers: Sequence[Trigger], base: Decision) -> Decision:
    """Stop, roll back or tune for the fired triggers."""
    stops = [t for t in triggers if t.action == Action.stop]
    if stops:
        why = "; ".join(t.name for t in stops)
        return replace(base, action=Action.stop, phase=Phase.stopped,
                        reasons=base.reasons + (f"stop requested by {why}",))
    exhausted = rollbacks_exhausted(spec, obs.rollbacks)
    if exhausted:
        return replace(base, action=Action.stop, phase=Phase.failed,
                        reasons=base.reasons + (f"stopping: {exhausted}",))
    return restart(spec, obs, triggers, base)


def restart(spec: CptRunSpec, obs: Observations, triggers: Sequence[Trigger], base: Decision) -> Decision:
    """A new attempt: rewind (rollback) or not (tune), with adjusted overrides."""
    rollbacks = [t for t in triggers if t.action == Action.rollback]
    if not rollbacks:
        target = newest_checkpoint(obs.points)
    elif any(t.to_base for t in rollbacks):
        target = BASE
    elif all(t.anomaly for t in rollbacks):
        target = anomaly_target(obs.checkpoints, obs.attempt, obs.skips, obs.start)
    else:
        target = last_good(spec, obs.base, obs.points)
    overrides, notes = adjust(spec, obs.overrides, [t.tune for t in triggers])
    overrides = overrides.model_copy(update={"skips": merge_skips(overrides.skips, obs.skips)})
    records = tuple(record(obs.attempt, t, target, overrides) for t in triggers)
    verb = "rolling back to" if rollbacks else "tuning from"
    return replace(base, action=Action.rollback if rollbacks else Action.tune, target=target,
                    overrides=overrides, records=records,
                    reasons=base.reasons + (f"{verb} {target} with lr x{overrides.lr_scale:.3g}, "
                                            f"replay +{overrides.replay_delta:.2f}"
                                            f"{skipping(overrides)}",),
                    warnings=base.warnings + tuple(notes))


def skipping(overrides: Overrides) -> str:
    if not overrides.skips:
        return ""
    sources = sorted({s.source for s in overrides.skips})
    return f", skipping {len(overrides.skips)} data window(s) of {', '.join(sources)}"


def record(attempt: int, trigger: Trigger, target: str, overrides: Overrides) -> RollbackRecord:
    return RollbackRecord(attempt=attempt, gate=trigger.name, metric=trigger.metric,
                          value=trigger.value, baseline=trigger.baseline, target=target,
                          overrides=overrides, reason=trigger.reason)


def finish_or_continue(spec: CptRunSpec, obs: Observations, base: Decision) -> Decision:
    if obs.budget_reached:
        return replace(base, action=Action.finish, phase=Phase.succeeded,
                        reasons=base.reasons + ("budget reached",))
    ending = plateau_reason(spec, obs.points, obs.attempt) or \
        no_improvement_reason(spec, obs.base, obs.points, obs.attempt)
    if ending:
        return replace(base, action=Action.finish, phase=Phase.succeeded,
                        reasons=base.reasons + (ending,))
    return base

