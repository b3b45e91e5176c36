"""One pass over one CptRun, whatever triggered it: read it fresh -> observe (`kube.observing`)
-> `reconcile` -> the start checks and pins (`policy.start_checks`) -> carry out the plan
(`kube.acting`) -> patch status. A timer pass observes cheaply first and decides again from fresh
reads before it acts (`kube.freshness`). The order of writes is what makes a crash at any point
safe: a new attempt's objects are created before the status that names it (a repeat finds and
adopts them), while a stop is recorded in status before the Job is deleted (a repeat issues the
stop again, see `reconcile`), so no decision is lost and nothing is created twice.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from pydantic import ValidationError

from cpt_api.load import errors_from
from cpt_api.spec import CptRunSpec
from cpt_api.storage import credentials_scope
from cpt_api.status import TERMINAL_PHASES, ConditionType, CptRunStatus, Phase, Reason
from ..policy.start_checks import check_root, check_start, pins_hold
from ..reconcile import Plan, reconcile_unreadable, set_condition
from .attempts import Attempts, Children
from .builders import RunRef, SpecProblem, checkpoint_root
from .checkpoints import claim_root, hold_start, write_pins
from .client import Forbidden, Rejected
from .freshness import acts
from .credentials import SecretUnreadable, use_run_credentials
from .observe import Requests, now_rfc3339, observed, requests
from .acting import (carry_out, delete_evaluations, discard_starts, gpus_held, hold_forbidden, refused_object,
                     report_invalid)
from .observing import Decided, decide, observe_attempt, run_attempts
from .runtime import Runtime, load_status
from .start_probe import ClusterProbe


@credentials_scope
def reconcile_run(rt: Runtime, namespace: str, name: str, *, watched: Children | None = None) -> Plan | None:
    """One pass. A timer pass gives the Jobs and pods its watches saw (`watched`): it observes
    from them and from shared and earlier reads (`kube.freshness`) and, if that would make it
    act, observes everything afresh and decides again."""
    with rt.lock(f"{namespace}/{name}"), rt.metrics.reconcile_seconds.time():
        body = rt.kube.read_run(namespace, name)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None
        run = RunRef(name=name, namespace=namespace, uid=meta["uid"])
        status = load_status(body.get("status") or {})
        asks = requests(meta.get("annotations"))
        read = _read_spec(rt, run, body, status)
        if read is None:
            return None
        spec, root = read
        try:  # every storage access below is the run's own
            use_run_credentials(rt.kube, run, spec, rt.settings.tenancy)
        except SecretUnreadable as exc:  # a finished run keeps the status it ended with
            if status.phase == Phase.running and status.attempt:
                return _unreadable(rt, run, body, spec, status, str(exc), exc.reason, watched)
            if status.phase not in TERMINAL_PHASES or asks.resume:
                report_invalid(rt, run, body, status, str(exc), exc.reason)
            return None
        decided = decide(rt, run, body, spec, status, root, asks.resume, watched)
        if watched is not None and acts(decided.plan, status.phase.value, rt.pinned.get(run.uid)):
            decided = decide(rt, run, body, spec, status, root, asks.resume, None)
        if not _may_carry_out(rt, run, body, spec, status, decided.plan):
            return None
        return _carry_out(rt, run, body, spec, status, asks, decided)


def _read_spec(rt: Runtime, run: RunRef, body: Mapping[str, Any],
               status: CptRunStatus) -> tuple[CptRunSpec, str] | None:
    """The run's spec and checkpoint root; None when the spec is invalid (reported)."""
    try:
        spec = CptRunSpec.model_validate(body.get("spec") or {})
        return spec, checkpoint_root(spec)
    except ValidationError as exc:
        report_invalid(rt, run, body, status, "; ".join(str(e) for e in errors_from(exc, "spec")))
    except SpecProblem as exc:
        report_invalid(rt, run, body, status, str(exc))
    return None


def _may_carry_out(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
                   plan: Plan) -> bool:
    """The start checks for a plan that starts an attempt (a refusal is reported), the pins for
    one that prunes (a hold is recorded), and the wait after a start the API server refused."""
    if plan.starts and not _start_allowed(rt, run, body, spec, status, plan):
        return False
    hold = pins_hold(write_pins(rt.pinned, run, spec, plan))
    if hold is not None and plan.prunes:
        hold_start(rt.kube, run, body, status, hold.message)
        return False
    backoff = rt.refused.get(run.uid)
    # refused for now: the condition says when it is tried again
    return not (backoff is not None and plan.starts and backoff.waiting(time.monotonic()))


def _start_allowed(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
                   plan: Plan) -> bool:
    """`policy.start_checks` over what the operator reads (`ClusterProbe`), then the root claimed."""
    check = check_start(spec, ClusterProbe(rt, run, body))
    if check.memory is not None:
        set_condition(plan.status, ConditionType.memory_planned, check.memory.planned, check.memory.reason.value,
                      check.memory.message, now_rfc3339())
    refusal = check.refusal or check_root(claim_root(run, spec))
    if refusal is not None:
        report_invalid(rt, run, body, status, refusal.message, refusal.reason)
        return False
    # the API server refused this generation's objects: none is sent again until the spec changes
    return not refused_object(body, status)


def _carry_out(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
               asks: Requests, decided: Decided) -> Plan | None:
    plan = decided.plan
    try:
        carry_out(rt, run, spec, body, plan, asks, status, decided.attempts)
        delete_evaluations(rt, run, decided.evaluated)
    except (Rejected, SpecProblem) as exc:  # attempts start first: nothing else was done
        discard_starts(rt, run, plan)
        report_invalid(rt, run, body, status, str(exc), Reason.invalid_object)
        return None
    except Forbidden as exc:
        discard_starts(rt, run, plan)
        hold_forbidden(rt, run, body, status, plan, str(exc))
        return None
    if plan.starts:
        rt.refused.pop(run.uid, None)
    if plan.status.phase in TERMINAL_PHASES:
        rt.forget(run.uid)
    rt.metrics.observe_run(run.uid, run.namespace, run.name, plan.status.phase.value, plan.status.attempt,
                           gpus_held(spec, plan, decided.state), plan.status.improved, plan.status.goodput,
                           plan.status.in_place_restarts)
    return plan


def _unreadable(rt: Runtime, run: RunRef, body: Mapping[str, Any], spec: CptRunSpec, status: CptRunStatus,
                problem: str, reason: Reason, watched: Children | None) -> Plan:
    """A pass of a running run whose Secret cannot be used: what its Job and pods show is still
    acted on (`reconcile_unreadable`), its storage is not touched. Like any pass, it acts only
    on fresh reads."""
    def decide_unreadable(children: Children | None) -> tuple[Plan, Attempts]:
        attempts = run_attempts(rt, run, status, children)
        obs = observed(body=body, attempt=observe_attempt(rt, spec, attempts, status.attempt), series=None,
                       points=[], refs=[], pods_left=attempts.pods_left, strays=attempts.strays)
        return reconcile_unreadable(spec, status, obs, problem, reason), attempts

    plan, attempts = decide_unreadable(watched)
    if watched is not None and acts(plan, status.phase.value, None):
        plan, attempts = decide_unreadable(None)
    carry_out(rt, run, spec, body, plan, Requests(), status, attempts)
    if plan.status.phase in TERMINAL_PHASES:
        rt.forget(run.uid)
    return plan
