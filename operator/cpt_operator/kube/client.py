# mypy: disable-error-code="no-untyped-call"
# (the kubernetes client has no type annotations)
"""The one module that talks to the Kubernetes API (besides kopf's own watching and events).

Every write is safe to repeat: creates with deterministic names treat AlreadyExists as found
(and adopt the object when it is ours), deletes treat NotFound as done, and the status patch
carries the resourceVersion it was computed from, so a concurrent writer causes a re-read
instead of a lost update.
"""
from __future__ import annotations

import base64
import json
import logging
from typing import Any, Callable, Mapping, Sequence, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cpt_api import kueue
from cpt_api.spec import GROUP, PLURAL, VERSION
from .builders import LABEL_RUN, Object, RunRef, run_label

log = logging.getLogger(__name__)


class Conflict(RuntimeError):
    """Someone else changed what this pass was computed from; compute it again."""


class NotOurs(RuntimeError):
    """An object with our deterministic name belongs to another owner."""


class KueueMissing(RuntimeError):
    """resources.queue names a Kueue LocalQueue, but the cluster serves no Workload API."""


class Rejected(RuntimeError):
    """The API server refused an object as invalid or forbidden (a 4xx that no retry changes)."""


class Forbidden(RuntimeError):
    """The API server refused an object for now (403): a full ResourceQuota (`count/jobs.batch`,
    pods, GPUs), an admission webhook or policy, permissions the operator lacks. Unlike `Rejected`
    it can pass without a spec change, so the start is tried again later."""


RETRYABLE = frozenset({404, 409, 429})
"""Client errors that can pass on their own: a namespace or object appearing, a conflict, a
rate limit. Any other 4xx is an answer about the object itself."""

REQUEST_TIMEOUT_S = (5.0, 30.0)
"""(connect, read) of every call: without one, a half-open connection blocks a reconcile pass,
and the run's lock with it, forever."""


WORKERS = 32
"""Reconcile passes that may run at once (kopf's executor); each holds one API connection."""


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # urllib3 keeps 10 connections a host by default: with more passes in flight the rest open
    # and drop a connection per call (TLS handshakes included), which shows in the p99
    defaults = client.Configuration.get_default_copy()
    defaults.connection_pool_maxsize = WORKERS
    client.Configuration.set_default(defaults)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 patch turning `old` into `new` (None removes a key; lists are replaced)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def _raw(response: Any) -> dict[str, Any]:
    """The JSON of a response read without the client's models: building typed objects and
    turning them back into dicts costs more than the request itself."""
    data: dict[str, Any] = json.loads(response.data)
    return data


def _api_message(exc: ApiException) -> str:
    """The API server's own words (its Status object's message), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or f"{exc.status} {exc.reason}")


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def children_of(listed: Mapping[str, Sequence[Mapping[str, Any]]], run: RunRef) -> dict[str, list[dict[str, Any]]]:
    """One run's objects out of objects of several runs, as `KubeClient.children` lists them."""
    label = run_label(run.name)
    return {kind: [dict(o) for o in items if (o.get("metadata", {}).get("labels") or {}).get(LABEL_RUN) == label
                   and (kind == "Pod" or _owned_by(o, run.uid))] for kind, items in listed.items()}


def _gone_ok(delete: Callable[[], Any]) -> bool:
    try:
        delete()
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


class KubeClient:
    def __init__(self, api_client: client.ApiClient | None = None,
                 timeout: float | tuple[float, float] = REQUEST_TIMEOUT_S):
        self.api = api_client or client.ApiClient()
        self.timeout = timeout
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # -- children ---------------------------------------------------------------------------
    def _creator(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        methods: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job)}
        return methods[kind]

    def ensure(self, obj: Object, owner: RunRef) -> bool:
        """Create `obj`; True if created, False if it was already there and ours. A ConfigMap
        found with other data (left by a try whose Job the API server refused, before the spec
        was fixed) is replaced: the attempt must run the config built now. `Rejected` when the
        API server refuses the object itself."""
        create, read = self._creator(obj["kind"])
        meta = obj["metadata"]
        try:
            create(meta["namespace"], obj, _request_timeout=self.timeout)
            return True
        except ApiException as exc:
            if exc.status != 409:
                _raise_rejected(exc, obj)
                raise
        existing = _raw(read(meta["name"], meta["namespace"], _preload_content=False, _request_timeout=self.timeout))
        if not _owned_by(existing, owner.uid):
            raise NotOurs(f"{obj['kind']} {meta['name']} exists and is not owned by CptRun {owner.name} "
                          f"({owner.uid})")
        if obj["kind"] == "ConfigMap" and existing.get("data") != obj.get("data"):
            self._replace_config_map(obj, existing["metadata"]["resourceVersion"])
        return False

    def _replace_config_map(self, obj: Object, resource_version: str) -> None:
        meta = obj["metadata"]
        body = {**obj, "metadata": {**meta, "resourceVersion": resource_version}}
        try:
            self.core.replace_namespaced_config_map(meta["name"], meta["namespace"], cast(Any, body),
                                                    _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:  # changed meanwhile: the next pass looks again
                raise Conflict(f"ConfigMap {meta['name']} changed while replacing it") from exc
            _raise_rejected(exc, obj)
            raise

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self.batch.read_namespaced_job(name, namespace, _preload_content=False,
                                                       _request_timeout=self.timeout))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = _raw(self.core.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False,
                                                  _request_timeout=self.timeout))
        return list(pods.get("items") or [])

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job; its pods go in the background (each gets its grace period to checkpoint)."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background",
                                             _request_timeout=self.timeout)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def delete_pods(self, namespace: str, label_selector: str, grace_s: int, live_only: bool = False) -> None:
        """Delete pods with a shorter grace than their own (the Job's deletion alone would give
        each its full terminationGracePeriodSeconds); `live_only` spares the pods that ended (a
        failed pod keeps its exit code and its log for the user)."""
        fields = "status.phase!=Failed,status.phase!=Succeeded" if live_only else None
        self.core.delete_collection_namespaced_pod(namespace, label_selector=label_selector, field_selector=fields,
                                                   grace_period_seconds=grace_s, _request_timeout=self.timeout)

    def children(self, run: RunRef, kinds: tuple[str, ...] = ("Job", "Pod", "ConfigMap", "Service")
                 ) -> dict[str, list[dict[str, Any]]]:
        """The run's objects of these kinds, labelled with it, by kind (pods are the Jobs' and
        are taken by label; the others only when the run owns them)."""
        lists = {"Job": self.batch.list_namespaced_job, "Pod": self.core.list_namespaced_pod,
                 "ConfigMap": self.core.list_namespaced_config_map, "Service": self.core.list_namespaced_service}
        found: dict[str, list[dict[str, Any]]] = {}
        for kind in kinds:
            list_ = lists[kind]
            items = _raw(list_(run.namespace, label_selector=f"{LABEL_RUN}={run_label(run.name)}",
                               _preload_content=False, _request_timeout=self.timeout)).get("items") or []
            found[kind] = [o for o in items if kind == "Pod" or _owned_by(o, run.uid)]
        return found

    def delete(self, namespace: str, kind: str, name: str) -> bool:
        """Delete a Job (its pods in the background), ConfigMap or Service; False if already gone."""
        delete = {"Job": self.delete_job, "ConfigMap": self._delete_config_map, "Service": self._delete_service}[kind]
        return delete(namespace, name)

    def _delete_config_map(self, namespace: str, name: str) -> bool:
        return _gone_ok(lambda: self.core.delete_namespaced_config_map(name, namespace,
                                                                       _request_timeout=self.timeout))

    def _delete_service(self, namespace: str, name: str) -> bool:
        return _gone_ok(lambda: self.core.delete_namespaced_service(name, namespace, _request_timeout=self.timeout))

    def run_jobs(self, run: RunRef) -> list[str]:
        listed = _raw(self.batch.list_namespaced_job(run.namespace, label_selector=f"{LABEL_RUN}={run_label(run.name)}",
                                                     _preload_content=False, _request_timeout=self.timeout)
                      ).get("items") or []
        return [str(j["metadata"]["name"]) for j in listed if _owned_by(j, run.uid)]

    def job_workload(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        """The Kueue Workload of a Job (None: not made yet). `KueueMissing` when the cluster has
        no Workload API."""
        try:
            found = self.custom.list_namespaced_custom_object(
                kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS,
                label_selector=f"{kueue.LABEL_JOB_UID}={job_uid}", _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                raise KueueMissing(f"no {kueue.WORKLOADS}.{kueue.GROUP}/{kueue.VERSION} API") from exc
            raise
        items = [i for i in cast(Mapping[str, Any], found).get("items") or []
                 if not i.get("metadata", {}).get("deletionTimestamp")]
        return dict(items[0]) if items else None

    def kueue_installed(self, namespace: str) -> bool:
        try:
            self.job_workload(namespace, "none")
            return True
        except KueueMissing:
            return False

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, decoded (`get` on that one Secret: the operator never lists them)."""
        found = _raw(self.core.read_namespaced_secret(name, namespace, _preload_content=False,
                                                      _request_timeout=self.timeout))
        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    # -- the CptRun itself ------------------------------------------------------------------
    def read_run(self, namespace: str, name: str) -> dict[str, Any]:
        found = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                         _request_timeout=self.timeout)
        return dict(cast(Mapping[str, Any], found))

    def patch_status(self, run: RunRef, resource_version: str, based_on: Mapping[str, Any],
                     new: Mapping[str, Any], attempts: int = 3) -> None:
        """Write the status computed from `based_on`. On a 409 the object is read again: if only
        its metadata or spec moved the patch is retried; if its status moved, this pass was
        computed from stale state and `Conflict` is raised."""
        for _ in range(attempts):
            patch = merge_patch(dict(based_on), dict(new))
            if not patch:
                return
            body = {"metadata": {"resourceVersion": resource_version}, "status": patch}
            try:
                self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, run.namespace, PLURAL,
                                                                  run.name, body, _request_timeout=self.timeout)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            fresh = self.read_run(run.namespace, run.name)
            if (fresh.get("status") or {}) != dict(based_on):
                raise Conflict(f"status of {run.namespace}/{run.name} changed while reconciling")
            resource_version = fresh["metadata"]["resourceVersion"]
        raise Conflict(f"status of {run.namespace}/{run.name}: still conflicting after {attempts} tries")

    def patch_annotations(self, namespace: str, name: str, annotations: Mapping[str, str | None],
                          resource_version: str | None = None) -> str:
        """Set (None: remove) annotations; returns the new resourceVersion. With `resource_version`
        the patch applies only to that version of the run, else `Conflict`."""
        meta: dict[str, Any] = {"annotations": dict(annotations)}
        if resource_version:
            meta["resourceVersion"] = resource_version
        try:
            done = self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                              {"metadata": meta}, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from exc
            raise
        return str(cast(Mapping[str, Any], done)["metadata"]["resourceVersion"])

    def update_annotation(self, namespace: str, name: str, key: str,
                          change: Callable[[Mapping[str, Any]], str | None], attempts: int = 5) -> None:
        """Set annotation `key` to `change(run)` (None: leave the run alone), read-modify-write
        guarded by resourceVersion, so `change` always judges the run it is about to write."""
        for _ in range(attempts):
            run = self.read_run(namespace, name)
            value = change(run)
            if value is None:
                return
            try:
                self.patch_annotations(namespace, name, {key: value}, run["metadata"]["resourceVersion"])
                return
            except Conflict:
                continue
        raise Conflict(f"{namespace}/{name}: could not update annotation {key} after {attempts} tries")



def _raise_rejected(exc: ApiException, obj: Object) -> None:
    """`Forbidden` for a 403, `Rejected` for another 4xx about the object itself; other errors are
    left to the caller."""
    if exc.status == 403:
        raise Forbidden(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(exc)}") from exc
    if exc.status is not None and 400 <= exc.status < 500 and exc.status not in RETRYABLE:
        raise Rejected(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(exc)}") from exc
