"""The run's own S3 identity for what the operator reads and writes on its behalf.

A run that names `resources.s3SecretRef` is read (checkpoints, records, run.json, pins, the
base's config.json) with that Secret's keys, the same its pods mount; if the operator cannot read
the Secret the run is not served at all (SpecValid=False, reason S3SecretUnreadable), never with
the operator's own identity, which may reach other teams' buckets. A run that names no Secret is
read with the operator's identity (its pod's AWS environment), which the platform team scopes,
or refuses (`tenancy.requireS3Secret`). A Secret's endpoint outside the platform team's
`tenancy.endpoints` is refused before the operator connects to it (reason NotAllowed).
"""
from __future__ import annotations

from typing import Protocol

from cpt_api.spec import CptRunSpec
from cpt_api.status import Reason
from cpt_api.storage import REQUIRED_KEYS, RUN_CREDENTIALS, S3Credentials
from cpt_api.tenancy import TenancyPolicy
from ..policy.tenancy import endpoint_refusal
from .builders import RunRef, checkpoint_root


class SecretReader(Protocol):
    def read_secret(self, namespace: str, name: str) -> dict[str, str]: ...


class SecretUnreadable(Exception):
    """The run's Secret cannot be used; the message names it, the cause and the fix."""

    reason = Reason.s3_secret_unreadable


class EndpointNotAllowed(SecretUnreadable):
    """The run's Secret sends S3 requests to an endpoint the platform team does not allow."""

    reason = Reason.not_allowed


_CAUSES = {403: "the operator may not read it (grant it `get` on Secrets: chart value rbac.readSecrets=true)",
           404: "it does not exist"}


def use_run_credentials(kube: SecretReader, run: RunRef, spec: CptRunSpec,
                        policy: TenancyPolicy | None = None) -> None:
    """Set the credentials of the current pass (inside `api.storage.credentials_scope`) to the
    run's Secret, or to the operator's own identity when the run names none."""
    from kubernetes.client.exceptions import ApiException

    name = spec.resources.s3_secret_ref
    if not name:
        RUN_CREDENTIALS.set(None)
        return
    where = f"Secret {run.namespace}/{name} (resources.s3SecretRef)"
    try:
        data = kube.read_secret(run.namespace, name)
    except ApiException as exc:
        if exc.status not in _CAUSES:
            raise  # the API server is unwell: the pass is retried
        raise SecretUnreadable(f"{where}: {_CAUSES[exc.status]}") from exc
    try:
        creds = S3Credentials.from_env(data)
    except KeyError as exc:
        raise SecretUnreadable(f"{where} has no {exc.args[0]} (it needs {' and '.join(REQUIRED_KEYS)}, "
                               "optionally AWS_ENDPOINT_URL)") from exc
    refused = endpoint_refusal(creds.endpoint, policy or TenancyPolicy(), where)
    if refused is not None:
        raise EndpointNotAllowed(refused)
    root = checkpoint_root(spec)
    if not root.startswith(("s3://", "s3a://")):
        raise SecretUnreadable(f"{where} holds S3 keys, but checkpoint.uri {root} is not on S3")
    RUN_CREDENTIALS.set(creds)
