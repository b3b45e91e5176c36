# mypy: disable-error-code="no-untyped-call"
"""`cptctl status | stop | resume | rollback` against a CptRun on a cluster.

Requests are annotations the operator acts on (`cpt.mlops.dev/stop`, `cpt.mlops.dev/resume`,
`cpt.mlops.dev/rollback-to`), so they need nothing but permission to patch the CptRun.
"""
from __future__ import annotations

from dataclasses import dataclass

import sys

from cpt_api.status import CptRunStatus, Phase
from ..policy.cadence import advice
from .settings import ANNOTATION_RESUME, ANNOTATION_ROLLBACK, ANNOTATION_STOP


def _client(kubeconfig: str | None, namespace: str | None):  # type: ignore[no-untyped-def]
    from kubernetes import config

    from .client import KubeClient

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_kube_config()
        except config.ConfigException:
            config.load_incluster_config()
    if namespace is None:
        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = active.get("context", {}).get("namespace") or "default"
        except config.ConfigException:
            namespace = "default"
    return KubeClient(), namespace


def _fail(run: str, namespace: str, exc: Exception) -> int:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException) and exc.status == 404:
        print(f"error: no CptRun {run!r} in namespace {namespace!r}", file=sys.stderr)
    else:
        print(f"error: {namespace}/{run}: {exc}", file=sys.stderr)
    return 2


def show_status(run: str, *, namespace: str | None, kubeconfig: str | None, as_json: bool = False) -> int:
    kube, ns = _client(kubeconfig, namespace)
    try:
        body = kube.read_run(ns, run)
    except Exception as exc:  # noqa: BLE001 - reported, not raised, like the local command
        return _fail(run, ns, exc)
    raw = body.get("status") or {}
    known = {f.alias or n for n, f in CptRunStatus.model_fields.items()}
    status = CptRunStatus.model_validate({k: v for k, v in raw.items() if k in known})
    if as_json:
        print(status.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        return 0
    print(status.describe(f"{ns}/{run}"))
    every = (body.get("spec") or {}).get("checkpoint", {}).get("every")
    line = advice(status, int(every)) if isinstance(every, int) else None
    if line:
        print(line)
    return 0


def _annotate(run: str, namespace: str | None, kubeconfig: str | None, key: str, value: str) -> tuple[int, str]:
    kube, ns = _client(kubeconfig, namespace)
    try:
        kube.patch_annotations(ns, run, {key: value})
    except Exception as exc:  # noqa: BLE001
        return _fail(run, ns, exc), ns
    return 0, ns


def request_stop(run: str, *, namespace: str | None, kubeconfig: str | None) -> int:
    code, ns = _annotate(run, namespace, kubeconfig, ANNOTATION_STOP, "true")
    if code == 0:
        print(f"stop requested for {ns}/{run}; the operator deletes its Job (trainers checkpoint on SIGTERM)")
    return code


def request_rollback(run: str, to: str, *, namespace: str | None, kubeconfig: str | None) -> int:
    code, ns = _annotate(run, namespace, kubeconfig, ANNOTATION_ROLLBACK, to)
    if code == 0:
        print(f"rollback to {to} requested for {ns}/{run}")
    return code


def request_resume(run: str, *, namespace: str | None, kubeconfig: str | None) -> int:
    """Continue a Stopped run from its newest checkpoint: the stop request goes (it would stop the
    new attempt at once) and a one-shot resume request takes its place."""
    kube, ns = _client(kubeconfig, namespace)
    try:
        body = kube.read_run(ns, run)
    except Exception as exc:  # noqa: BLE001
        return _fail(run, ns, exc)
    phase = (body.get("status") or {}).get("phase", Phase.pending.value)
    if phase != Phase.stopped.value:
        print(f"error: {ns}/{run} is {phase}; only a Stopped run can be resumed", file=sys.stderr)
        return 2
    try:
        kube.patch_annotations(ns, run, {ANNOTATION_STOP: None, ANNOTATION_RESUME: "true"},
                               body["metadata"]["resourceVersion"])
    except Exception as exc:  # noqa: BLE001
        return _fail(run, ns, exc)
    print(f"resume requested for {ns}/{run}; the operator starts a new attempt from its newest checkpoint")
    return 0


@dataclass(frozen=True)
class ClusterCommands:
    """`cptctl status | stop | resume | rollback` for a CptRun on a cluster."""

    run: str
    namespace: str | None = None
    kubeconfig: str | None = None

    def show_status(self, as_json: bool = False) -> int:
        return show_status(self.run, namespace=self.namespace, kubeconfig=self.kubeconfig, as_json=as_json)

    def request_stop(self) -> int:
        return request_stop(self.run, namespace=self.namespace, kubeconfig=self.kubeconfig)

    def request_resume(self) -> int:
        return request_resume(self.run, namespace=self.namespace, kubeconfig=self.kubeconfig)

    def request_rollback(self, to: str) -> int:
        return request_rollback(self.run, to, namespace=self.namespace, kubeconfig=self.kubeconfig)
