"""The reconcile core: (spec, status, what is observed) -> Plan(actions, new status).

Pure and shared by both backends: the local runner observes torchrun subprocesses and their
event logs, the operator observes Jobs and Prometheus; each carries out the same actions its own
way. Running it twice on the same inputs gives the same plan, and every decision is written into
the status it returns, so a restart of the caller at any point loses nothing.

State machine (phase):
  Pending --start attempt 1--> Running
  Running --gate/anomaly: rollback|tune--> RollingBack --old attempt gone--> Running (attempt+1)
  Running --attempt failed--> Running (attempt+1 from its last checkpoint; bounded) | Failed
  Running --pods not started by the start deadline / failed before the trainer ran--> Failed
  Running --budget reached / plateau--> Succeeded (checkpoint chosen on the Pareto frontier)
  Running --stop requested--> Stopping --attempt gone--> Stopped
  Running --gate: stop / rollbacks exhausted--> Failed

This package is the core's one public face; its modules, in the order a pass uses them:
  observed     what the backend saw (AttemptState, Observed)
  actions      what the pass asks of the backend (StartAttempt, StopAttempt, Pin, ..., Plan)
  planner      one pass's working state and the steps decisions are made of
  summaries    status restating the observations (checkpoints, frontier, SpecValid)
  attempts     one attempt at a time: restarts, lineage, sweeping leftovers
  evaluations  separate evaluation: owed, started, stopped, the Evaluated condition
  phases       the per-phase decision, in order of precedence
  decisions    the policy's decisions carried out (rollback, stop, finish; manual and alert rollbacks)
  queueing     Kueue admission and eviction
  starts       the Started condition and the start deadline
  passes       the two passes (`reconcile`, `reconcile_unreadable`) and the pins
  configs      what the trainer and evaluator of an action run with
Nothing here does I/O or imports a Kubernetes client.
"""
from __future__ import annotations

from .actions import (ActionT, Emit, Evaluate, Pin, Plan, Release, StartAttempt, StopAttempt, StopEvaluations,
                      Sweep)
from .configs import attempt_config, evaluation_config, evaluation_target
from .observed import AttemptPhase, AttemptState, Observed
from .passes import reconcile, reconcile_unreadable
from .planner import set_condition

__all__ = [
    "ActionT", "AttemptPhase", "AttemptState", "Emit", "Evaluate", "Observed", "Pin", "Plan", "Release",
    "StartAttempt", "StopAttempt", "StopEvaluations", "Sweep", "attempt_config", "evaluation_config",
    "evaluation_target", "reconcile", "reconcile_unreadable", "set_condition",
]
