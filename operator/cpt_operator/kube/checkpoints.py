"""The operator's side of the start checks (`policy.start_checks` decides): what it reads and
does for them, and how it records a hold.

A CptRun claims its checkpoint root (`run.json`) before its first Job exists, and a root that
another run claimed keeps it from starting (`CheckpointUriInUse`); its pins (`pinned.json`)
are written before any Job that could prune, and a pin the store refused holds the start
(`CheckpointsPinned=False`, retried every pass). Format and rules: `cpt_api.ownership`.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol

from cpt_api.ownership import RunRecord, owner_problem
from cpt_api.spec import CptRunSpec
from cpt_api.status import ConditionType, CptRunStatus, Reason
from ..policy.start_checks import pin_failure
from ..reconcile import Pin, Plan, set_condition
from cpt_api.store import claim, pin
from .builders import RunRef, checkpoint_root
from .observe import now_rfc3339

log = logging.getLogger(__name__)


class StatusWriter(Protocol):
    def patch_status(self, run: RunRef, resource_version: str, based_on: Mapping[str, Any],
                     new: Mapping[str, Any], attempts: int = ...) -> None: ...


def claim_root(run: RunRef, spec: CptRunSpec) -> str | None:
    """Why the run may not use checkpoint.uri (None: the root is this run's, claimed now if it
    had no owner)."""
    root = checkpoint_root(spec)
    record = RunRecord(uid=run.uid, name=run.name, namespace=run.namespace)
    return owner_problem(root, claim(root, record), record)


def write_pins(written: dict[str, Pin], run: RunRef, spec: CptRunSpec, plan: Plan) -> str | None:
    """Write the plan's pins unless `written` (per run UID) says they already are; returns why
    the store refused them, also recorded in the plan's status, or None."""
    pins = next((a for a in plan.actions if isinstance(a, Pin)), None)
    if pins is None or written.get(run.uid) == pins:
        return None
    try:
        pin(checkpoint_root(spec), list(pins.names), dict(pins.judged))
    except OSError as exc:
        why = pin_failure(pins.names, exc)
        log.warning("%s/%s: %s: %s", run.namespace, run.name, why, exc)
        set_condition(plan.status, ConditionType.checkpoints_pinned, False, Reason.pin_failed.value, why,
                      now_rfc3339())
        return why
    written[run.uid] = pins
    if any(c.type == ConditionType.checkpoints_pinned.value for c in plan.status.conditions):
        set_condition(plan.status, ConditionType.checkpoints_pinned, True, Reason.pinned.value,
                      f"{len(pins.names)} checkpoints pinned", now_rfc3339())
    return None


def hold_start(kube: StatusWriter, run: RunRef, body: Mapping[str, Any], status: CptRunStatus, why: str) -> None:
    """The attempt's start (or a stop that saves) waits, since its trainer would prune by pins
    that are not written: only the condition is recorded, and the next pass plans the same and
    tries again."""
    st = status.model_copy(deep=True)
    set_condition(st, ConditionType.checkpoints_pinned, False, Reason.pin_failed.value, why, now_rfc3339())
    old = body.get("status") or {}
    if st.dump() != old:
        kube.patch_status(run, body["metadata"]["resourceVersion"], old, st.dump())
