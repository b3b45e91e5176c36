"""Anomaly rules: what the control plane does with the trainer's anomaly events.

The trainer handles single anomalies itself: it skips a step whose gradient norm exceeds
`mean + k·std` of the recent window (or whose loss spikes, or is not finite) and, after
`maxConsecutive` such steps, restores its last stable checkpoint (a `restored` event). The
policy acts on what that local recovery cannot fix:

* `restored` events repeated within one attempt (>= RESTORES_BEFORE_ROLLBACK): the trajectory
  keeps diverging from the same place, so restoring again will not help: roll back to the last
  good checkpoint with the LR halved (`ANOMALY_TUNE`; more replay does not cure divergence).
* `non_finite` events, when `gradient.anomaly.onNonFinite` is `rollback` or `stop`: the
  trainer only skips such steps; the policy rolls back or stops the run.

Counted per attempt: a new attempt starts with a clean slate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..api.evaluation import TuneSpec
from ..api.spec import CptRunSpec, NonFiniteAction
from .types import Action

RESTORES_BEFORE_ROLLBACK = 2
ANOMALY_TUNE = TuneSpec(lr_factor=0.5, replay_delta=0.0)


@dataclass(frozen=True, kw_only=True)
class AnomalyFinding:
    rule: str
    """Rule name, recorded as the `gate` of a RollbackRecord."""
    action: Action
    count: int
    reason: str


def anomaly_findings(spec: CptRunSpec, counts: Mapping[str, int]) -> list[AnomalyFinding]:
    """The anomaly rules that fire for the current attempt's event counts."""
    findings: list[AnomalyFinding] = []
    restores = counts.get("restored", 0)
    if restores >= RESTORES_BEFORE_ROLLBACK:
        findings.append(AnomalyFinding(
            rule="anomaly-restores", action=Action.rollback, count=restores,
            reason=f"the trainer restored its last stable checkpoint {restores} times in this "
                   f"attempt; local recovery is not converging"))
    non_finite = counts.get("non_finite", 0)
    on_non_finite = spec.gradient.anomaly.on_non_finite
    if non_finite and on_non_finite != NonFiniteAction.skip:
        findings.append(AnomalyFinding(
            rule="anomaly-non-finite", action=Action(on_non_finite.value), count=non_finite,
            reason=f"{non_finite} non-finite loss / gradient step(s); "
                   f"onNonFinite is {on_non_finite.value}"))
    return findings


def anomaly_notes(counts: Mapping[str, int]) -> list[str]:
    """Human-readable counts of anomalies that need no action (they are in the reasons so a
    `continue` still says what the trainer coped with)."""
    kinds = ("grad_norm", "loss_spike")
    return [f"{counts[k]} {k.replace('_', '-')} anomalies skipped this attempt"
            for k in kinds if counts.get(k)]
