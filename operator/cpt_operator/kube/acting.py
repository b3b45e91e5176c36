"""Carrying out a plan on the cluster, and recording what keeps one from being carried out: an
invalid spec or refused start (SpecValid=False, once), objects the API server refused for now
(Progressing=False, retried after a doubling delay)."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from cpt_api.spec import CptRunSpec
from cpt_api.status import ConditionType, CptRunStatus, Phase, Reason
from ..reconcile import (AttemptState, Emit, Evaluate, Plan, Release, StartAttempt, StopAttempt, StopEvaluations,
                         Sweep, set_condition)
from .attempts import Attempts
from .builders import RunRef, attempt_name, selector, trainer_config
from .backoff import Backoff
from .evaluations import build as build_evaluation, evaluation_name
from .observe import Requests, now_rfc3339
from .runtime import Runtime


# -- acting ----------------------------------------------------------------------------------
def _start(rt: Runtime, run: RunRef, spec: CptRunSpec, action: StartAttempt) -> None:
    config = trainer_config(run, spec, action, rt.settings)
    for obj in rt.launcher.build(run, spec, config):
        rt.kube.ensure(obj, run)


def _count_decisions(rt: Runtime, run: RunRef, before: CptRunStatus, after: CptRunStatus) -> None:
    for record in after.history[len(before.history):]:
        rt.metrics.gate_breaches.labels(run.namespace, run.name, record.gate).inc()
    if after.rollbacks > before.rollbacks:
        target = after.history[-1].target if after.history else "base"
        rt.metrics.rollbacks.labels(run.namespace, run.name, target).inc()


def carry_out(rt: Runtime, run: RunRef, spec: CptRunSpec, body: Mapping[str, Any], plan: Plan,
               asks: Requests, before: CptRunStatus, attempts: Attempts) -> None:
    for action in plan.actions:
        if isinstance(action, StartAttempt):
            _start(rt, run, spec, action)
    version = body["metadata"]["resourceVersion"]
    if asks.one_shot:
        # cleared before the decision is recorded: a crash in between loses the request (the user
        # can repeat it) rather than rolling back twice. Cleared at the version they were read at:
        # a request made since then is not wiped unseen (the Conflict runs the pass again).
        version = rt.kube.patch_annotations(run.namespace, run.name, {k: None for k in asks.one_shot}, version)
    rt.kube.patch_status(run, version, body.get("status") or {}, plan.status.dump())
    _count_decisions(rt, run, before, plan.status)
    for action in plan.actions:
        if isinstance(action, StopAttempt):
            rt.kube.delete_job(run.namespace, attempt_name(run.name, action.number))
            if not action.checkpoint:
                rt.kube.delete_pods(run.namespace, selector(run, action.number), rt.settings.rollback_grace_s)
        elif isinstance(action, Release):
            rt.kube.delete_pods(run.namespace, selector(run, action.number), rt.settings.rollback_grace_s,
                                live_only=True)
        elif isinstance(action, Sweep):
            for number in action.numbers:
                for kind, name in attempts.stray_objects.get(number, []):
                    rt.kube.delete(run.namespace, kind, name)
                rt.kube.delete_pods(run.namespace, selector(run, number), rt.settings.rollback_grace_s)
        elif isinstance(action, Emit):
            rt.emit(body, action.type, action.reason, action.message)
        elif isinstance(action, Evaluate):
            for obj in build_evaluation(run, spec, action, rt.settings):
                rt.kube.ensure(obj, run)
        elif isinstance(action, StopEvaluations):
            delete_evaluations(rt, run, [evaluation_name(run.name, t) for t in action.targets])


def delete_evaluations(rt: Runtime, run: RunRef, names: Sequence[str]) -> None:
    for name in names:
        rt.kube.delete_job(run.namespace, name)
        rt.kube.delete(run.namespace, "ConfigMap", name)


def hold_forbidden(rt: Runtime, run: RunRef, body: Mapping[str, Any], status: CptRunStatus, plan: Plan,
                    why: str) -> None:
    """The API server refused the attempt's objects for now: nothing else of the pass is done
    (its status stays as it was, but for Progressing=False naming the refusal), and the start is
    tried again after a doubling delay."""
    backoff = rt.refused.setdefault(run.uid, Backoff())
    delay = backoff.failed(time.monotonic())
    number = next(a.number for a in plan.actions if isinstance(a, StartAttempt))
    message = f"attempt {number} could not be created: {why}; trying again in {delay:.0f} s"
    st = status.model_copy(deep=True)
    set_condition(st, ConditionType.progressing, False, Reason.create_forbidden.value, message, now_rfc3339())
    old = body.get("status") or {}
    rt.kube.patch_status(run, body["metadata"]["resourceVersion"], old, st.dump())
    if backoff.failures == 1:
        rt.emit(body, "Warning", Reason.create_forbidden.value, message)


_REFUSED = {Reason.invalid_spec: "invalid spec", Reason.wont_fit: "not started", Reason.invalid_object: "not started",
            Reason.checkpoint_uri_in_use: "not started", Reason.s3_secret_unreadable: "not started",
            Reason.kueue_not_installed: "not started", Reason.not_allowed: "not started"}


def report_invalid(rt: Runtime, run: RunRef, body: Mapping[str, Any], status: CptRunStatus, message: str,
                    reason: Reason = Reason.invalid_spec) -> None:
    """SpecValid=False with `reason`, once: a repeat of the same verdict patches and emits nothing."""
    st = status.model_copy(deep=True)
    st.observed_generation = body["metadata"].get("generation")
    set_condition(st, ConditionType.spec_valid, False, reason.value, message, now_rfc3339())
    st.message = f"{_REFUSED[reason]}: {message}"
    old = body.get("status") or {}
    if st.dump() != old:
        rt.kube.patch_status(run, body["metadata"]["resourceVersion"], old, st.dump())
        rt.emit(body, "Warning", reason.value, message)


def discard_starts(rt: Runtime, run: RunRef, plan: Plan) -> None:
    """Delete what a refused start created before the refusal (its ConfigMap, its Service): the
    attempt was never recorded, so nothing else would own them."""
    for action in plan.actions:
        if isinstance(action, StartAttempt):
            for kind in ("ConfigMap", "Service", "Job"):
                rt.kube.delete(run.namespace, kind, attempt_name(run.name, action.number))


def refused_object(body: Mapping[str, Any], status: CptRunStatus) -> bool:
    """The API server refused an attempt's objects at this spec generation: the same objects
    would be refused again, so none is sent until the spec changes."""
    return any(c.type == ConditionType.spec_valid.value and c.status == "False"
               and c.reason == Reason.invalid_object.value
               and c.observed_generation == body["metadata"].get("generation") for c in status.conditions)


def gpus_held(spec: CptRunSpec, plan: Plan, state: AttemptState) -> int:
    if spec.resources.queue and (state.admission is None or state.admission.state != "admitted"):
        return 0  # a queued gang holds nothing until Kueue admits it
    holding = plan.status.phase in (Phase.running, Phase.rolling_back) and (
        state.state == "running" or any(isinstance(a, StartAttempt) for a in plan.actions))
    return spec.resources.nodes * spec.resources.gpus_per_node if holding else 0
