"""Pure decisions: gates, stop rules, rollback targets, Pareto selection, LR / replay adjustments.

No I/O and no clients: callers (the local runner, the operator's reconcile) read events,
manifests and status, build plain values, and act on the answer. Same inputs, same answer.

API
---
`decide(spec: CptRunSpec, obs: Observations) -> Decision`
    What to do now: `Action.cont` ("continue"), `rollback`, `tune`, `stop` or `finish`, with
    human-readable `reasons`, the `breached` gates (`GateOutcome`: value, baseline,
    regression, streak), the restore `target` (`"base"` or a checkpoint name), the `overrides`
    for the next attempt, one `api.status.RollbackRecord` per cause, `warnings` (missing
    metrics etc.) and, for stop / finish, the terminal `phase`. Precedence: `decide.py`.

`select_checkpoint(spec: CptRunSpec, base: Mapping[str, float],
                   checkpoints: Sequence[CheckpointEvals]) -> Selection`
    Pareto frontier over (domain, general, safety), the gate score J per checkpoint, which
    checkpoints pass every gate, and the chosen one (`pareto.py`).

Building blocks, usable alone: `judge_gates` (gates.py), `plateau_reason` (stop.py),
`anomaly_findings` (anomaly.py), `last_good` / `adjust` (rollback.py), `pareto_front` /
`normalised_gain` (pareto.py, metrics.py).

Inputs
------
`Observations(attempt, base, points=[EvalPoint(attempt, step, tokens, metrics, checkpoint,
stable)], anomalies={kind: count} for the current attempt, rollbacks, overrides,
budget_reached, skips=[api.skips.DataSkip] the attempt's trainer blamed, start, checkpoints)`.
Metric keys are `suite.metric` as the evaluator reports them.
"""
from .anomaly import anomaly_findings
from .decide import decide
from .gates import judge_gates, passes_all
from cpt_api.metrics import metric_key, normalised_gain, regression
from .pareto import pareto_front, select_checkpoint
from .rollback import adjust, last_good
from .stop import plateau_reason
from .types import (BASE, Action, CheckpointEvals, Decision, EvalPoint, GateOutcome,
                    Observations, Selection)

__all__ = [
    "BASE", "Action", "CheckpointEvals", "Decision", "EvalPoint", "GateOutcome", "Observations",
    "Selection", "adjust", "anomaly_findings", "decide", "judge_gates", "last_good",
    "metric_key", "normalised_gain", "pareto_front", "passes_all", "plateau_reason",
    "regression", "select_checkpoint",
]
