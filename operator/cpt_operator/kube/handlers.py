"""kopf handlers: thin, over one pass (`kube.passes.reconcile_run`) of the pure reconcile core.

Every trigger (create, resume, change, a Job that ended, a timer every few seconds) runs the same
pass for one CptRun; a timer pass gives it what the operator's watches saw of the run's Jobs and
pods. Kopf's settings, the metrics server and the alert webhook are set up at start-up.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import kopf

from cpt_api.spec import GROUP, PLURAL, VERSION
from cpt_api.storage import summarise_error
from cpt_api.status import TERMINAL_PHASES
from .attempts import Children
from .builders import LABEL_RUN, RunRef, run_label
from .client import WORKERS, Conflict, NotOurs
from .observe import requests
from .settings import FINALIZER, Settings

from .passes import reconcile_run
from .runtime import Runtime, build_runtime

SETTINGS = Settings.from_env()
log = logging.getLogger(__name__)


def _pass(memo: kopf.Memo, namespace: str | None, name: str | None,
          logger: logging.Logger | logging.LoggerAdapter[Any], watched: Children | None = None) -> None:
    from kubernetes.client.exceptions import ApiException

    assert namespace and name, "CptRun is namespaced"
    try:
        reconcile_run(memo.runtime, namespace, name, watched=watched)
    except Conflict as exc:
        raise kopf.TemporaryError(str(exc), delay=1) from exc
    except NotOurs as exc:
        logger.error("%s", exc)
        raise kopf.TemporaryError(str(exc), delay=30) from exc
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile
        raise kopf.TemporaryError(f"Kubernetes API: {exc.status} {exc.reason}", delay=5) from exc
    except OSError as exc:  # the checkpoint store: kopf posts the message as an event, so summarised
        log.warning("%s/%s: checkpoint store: %s", namespace, name, exc)  # not kopf's logger: no event
        raise kopf.TemporaryError(f"checkpoint store: {summarise_error(exc)}", delay=10) from exc


# -- kopf wiring -----------------------------------------------------------------------------
@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from prometheus_client import start_http_server

    from .webhook import make_app, serve

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="cpt.mlops.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="cpt.mlops.dev", key="last-handled-configuration")
    # kopf's watches can stall silently without timeouts (kopf #585, #1120)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Namespaced installs get no cluster-wide RBAC: serve the named namespaces and the CRDs
    # found at start-up instead of watching namespaces and CRDs (which would only log denials).
    settings.scanning.disabled = bool(SETTINGS.namespaces)
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = WORKERS
    runtime = build_runtime(SETTINGS)
    memo.runtime = runtime
    start_http_server(SETTINGS.metrics_port, registry=runtime.metrics.registry)
    memo.webhook = await serve(make_app(SETTINGS.webhook_token, runtime.record_alert), SETTINGS.webhook_port)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "webhook", None) is not None:
        await memo.webhook.cleanup()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(*, namespace: str | None, name: str | None, memo: kopf.Memo,
              logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    _pass(memo, namespace, name, logger)


def finished(status: Mapping[str, Any] | None) -> bool:
    return (status or {}).get("phase") in {p.value for p in TERMINAL_PHASES}


def settled(status: Mapping[str, Any] | None, annotations: Mapping[str, str] | None) -> bool:
    """Finished with nothing asked of it: looked at rarely. A resume request makes the run
    active again at once (its next attempt may wait for the last one's pods, pass after pass)."""
    return finished(status) and not requests(annotations).resume


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.interval_s, sharp=False,
            when=lambda status, annotations, **_: not settled(status, annotations))
def on_timer(*, namespace: str | None, name: str | None, memo: kopf.Memo,
             logger: logging.Logger | logging.LoggerAdapter[Any], **indices: Any) -> None:
    """A steady look at an active run, from what the watches saw (`run_jobs`, `run_pods`)."""
    key = (namespace, run_label(name or ""))
    # list() of a store is one C-level copy under the GIL: safe while kopf's loop updates it
    watched = {kind: list(indices[index].get(key, [])) for kind, index in (("Job", "run_jobs"), ("Pod", "run_pods"))}
    _pass(memo, namespace, name, logger, watched)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.finished_interval_s, sharp=False,
            initial_delay=SETTINGS.finished_interval_s,
            when=lambda status, annotations, **_: settled(status, annotations))
def on_finished_timer(*, namespace: str | None, name: str | None, memo: kopf.Memo,
                      logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """A finished run is looked at rarely: kopf stops one timer and starts the other as the
    phase changes (its filters are matched on every change of the run)."""
    _pass(memo, namespace, name, logger)


def _watched(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a timer pass needs of a Job or pod (names, uid, labels, owners, deletion, status): kept
    for every one of them, so without the spec and managedFields."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "ownerReferences", "deletionTimestamp")
            if k in meta}
    return {"kind": body.get("kind"), "metadata": kept, "status": dict(body.get("status") or {})}


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def run_jobs(*, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    """Every run's Jobs, by (namespace, run label), as the watch last saw them."""
    return {(namespace, labels[LABEL_RUN]): _watched(body)}


@kopf.index("v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
def run_pods(*, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    """Every run's pods, likewise: timer passes read these instead of listing them."""
    return {(namespace, labels[LABEL_RUN]): _watched(body)}


def _job_moved(body: Mapping[str, Any], **kwargs: Any) -> bool:
    """A Job event worth a pass now: it ended, failed, or went. A running Job's other updates
    (pods becoming ready, counts) change nothing a pass decides; the timer sees them."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return kwargs.get("type") == "DELETED" or bool(body.get("metadata", {}).get("deletionTimestamp")) or \
        any(c.get("status") == "True" for c in conditions)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT}, when=_job_moved)
def on_job_event(*, body: kopf.Body, namespace: str | None, memo: kopf.Memo,
                 logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """A Job of a run changed (finished, failed, deleted): decide now rather than at the next tick."""
    owner = next((ref for ref in body.get("metadata", {}).get("ownerReferences") or []
                  if ref.get("kind") == "CptRun" and ref.get("apiVersion", "").startswith(f"{GROUP}/")), None)
    if owner is not None and getattr(memo, "runtime", None) is not None:
        _pass(memo, namespace, owner["name"], logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(*, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """The finalizer: stop every attempt; checkpoints stay where they are."""
    assert namespace, "CptRun is namespaced"
    rt: Runtime = memo.runtime
    run = RunRef(name=name, namespace=namespace, uid=body["metadata"]["uid"])
    stopped = [job for job in rt.kube.run_jobs(run) if rt.kube.delete_job(namespace, job)]
    log.info("%s/%s deleted: stopped %s; checkpoints are kept", namespace, name, ", ".join(stopped) or "nothing")
    rt.metrics.forget_run(run.uid, namespace, name)
    rt.forget(run.uid, deleted=True)
    with rt.guard:
        rt.locks.pop(f"{namespace}/{name}", None)
