"""Anomaly rules: what the control plane does with the trainer's anomaly events.

The trainer handles single anomalies itself: it skips a step whose gradient norm exceeds
`mean + k·std` of the recent window (or whose loss spikes, or is not finite) and, after
`maxConsecutive` such steps, restores its last stable checkpoint (a `restored` event). The
policy acts on what that local recovery cannot fix:

* `restored` events repeated within one attempt (>= RESTORES_BEFORE_ROLLBACK): restoring again
  inside the attempt will not help. What PaLM did, in order: restart from the last stable
  checkpoint *before the spike* (`anomaly_target`, never an earlier one the gates would pick)
  and skip the data windows the trainer blamed (`api.skips`, carried in the overrides into
  every later attempt). The LR is halved (`ANOMALY_TUNE`; more replay does not cure
  divergence) only when the data cannot explain the anomalies (`anomaly_tune`): a restore the
  trainer could not attribute to one source, or anomalies that recur in an attempt that
  already skips windows.
* `non_finite` events, when `gradient.anomaly.onNonFinite` is `rollback` or `stop`: the
  trainer only skips such steps; the policy rolls back or stops the run.

Counted per attempt: a new attempt starts with a clean slate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from cpt_api.evaluation import TuneSpec
from cpt_api.skips import DataSkip
from cpt_api.spec import CptRunSpec, NonFiniteAction
from .types import BASE, Action, CheckpointEvals

RESTORES_BEFORE_ROLLBACK = 2
ANOMALY_TUNE = TuneSpec(lr_factor=0.5, replay_delta=0.0)
SKIP_TUNE = TuneSpec(lr_factor=1.0, replay_delta=0.0)
"""Data-caused anomalies: skipping the windows is the cure, the LR stays."""


@dataclass(frozen=True, kw_only=True)
class AnomalyFinding:
    rule: str
    """Rule name, recorded as the `gate` of a RollbackRecord."""
    action: Action
    count: int
    reason: str


def anomaly_findings(spec: CptRunSpec, counts: Mapping[str, int],
                     skips: Sequence[DataSkip] = ()) -> list[AnomalyFinding]:
    """The anomaly rules that fire for the current attempt's event counts (and the data
    windows its trainer blamed)."""
    findings: list[AnomalyFinding] = []
    restores = counts.get("restored", 0)
    if restores >= RESTORES_BEFORE_ROLLBACK:
        blamed = sorted({s.source for s in skips})
        cause = (f"; the loss spiked in source(s) {', '.join(blamed)}: their windows are "
                 f"skipped from now on" if blamed else "")
        findings.append(AnomalyFinding(
            rule="anomaly-restores", action=Action.rollback, count=restores,
            reason=f"the trainer restored its last stable checkpoint {restores} times in this "
                   f"attempt; local recovery is not converging{cause}"))
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


def anomaly_tune(restores: int, found: Sequence[DataSkip], skipping: Sequence[DataSkip]) -> TuneSpec:
    """Data first, LR second. `found`: windows this attempt's trainer blamed; `skipping`:
    windows the attempt already skipped. Keep the LR when every restore was blamed on a window
    and the attempt skipped nothing yet; else the anomalies outlived the data: halve it."""
    explained = restores > 0 and len(found) >= restores
    return SKIP_TUNE if explained and not skipping else ANOMALY_TUNE


def anomaly_target(checkpoints: Sequence[CheckpointEvals], attempt: int,
                   found: Sequence[DataSkip], start: str = BASE) -> str:
    """The newest stable checkpoint of the current attempt saved before its first spike, else
    the point the attempt started from. Not `lastGood`: the gates judge forgetting, and a
    checkpoint they reject is no reason to throw away the attempt's progress on an anomaly.
    Any committed checkpoint counts, evaluated or not. Without a known spike step only the
    start point is sure to precede it."""
    if not found:
        return start
    spike = min(s.step for s in found)
    before = [c for c in checkpoints if c.attempt == attempt and c.stable and c.step < spike]
    return max(before, key=lambda c: c.step).name if before else start
