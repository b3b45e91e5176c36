"""How the spec's storage URIs are opened: the S3 endpoint comes from the standard AWS environment.

The spec holds only `s3://bucket/key` URIs; endpoint and credentials come from the standard AWS
environment (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), which a pod gets from a Secret. s3fs 2026.9 with aiobotocore 3.10 /
botocore 1.43 honours all of them by itself (checked against versitygw in
tests/e2e/test_data_s3.py); the endpoint is still passed explicitly because older s3fs /
aiobotocore pairings ignore AWS_ENDPOINT_URL and would silently talk to AWS instead.

One home for the trainer (data sources, caches) and the operator (the memory planner reading a
base's config.json): both must reach the same store the same way.

The operator reads and writes a run's storage (checkpoints, records, run.json, pins, the base's
config.json) on the run's behalf, so it does so with the run's own credentials when the run names
them (`resources.s3SecretRef`): `RUN_CREDENTIALS` holds them for one reconcile pass, and
`storage_options` passes them to s3fs instead of letting it fall back to the operator's identity.
fsspec caches a filesystem per argument set (the keys included), so each credential set gets its
own instance and no run is served by an instance holding another's keys.
"""
from __future__ import annotations

import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, ParamSpec, TypeVar

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""Schemes of the object stores runs read and write."""
URI_PATTERN = rf"^(?:(?:{'|'.join(OBJECT_STORE_SCHEMES)}|file)://|[^:]*$)"
"""What a storage URI in a spec may be: an object store, file://, or a plain path (no scheme).
Anything else (http, ftp, ssh, memory, ...) is refused: the operator itself opens some of these
URIs (a base's config.json, the checkpoint root), and must not be made to fetch arbitrary
endpoints on a user's behalf."""


def is_object_store(uri: str) -> bool:
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme in OBJECT_STORE_SCHEMES


STAGING_DIR_ENV = "CPT_STAGING_DIR"
"""Where a trainer stages a save to object storage (each rank's files, removed once uploaded):
the pod's work volume, which `resources.scratch` sizes (set by the operator's launcher); unset,
the system's temporary directory."""

REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""Keys an `s3SecretRef` Secret must hold. Its keys are the standard AWS environment: the trainer
pods get them by envFrom, the operator reads the Secret itself."""


@dataclass(frozen=True)
class S3Credentials:
    """A run's S3 identity, as its pods see it."""

    key: str
    secret: str
    token: str | None = None
    endpoint: str | None = None
    """None: the operator's environment's endpoint (AWS itself when that names none)."""
    region: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Credentials:
        """From a Secret's decoded data; KeyError names a required key that is missing or empty."""
        for required in REQUIRED_KEYS:
            if not env.get(required):
                raise KeyError(required)
        key, secret = (env[k] for k in REQUIRED_KEYS)
        return cls(key=key, secret=secret, token=env.get("AWS_SESSION_TOKEN") or None,
                   endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)

    def __repr__(self) -> str:  # keys end up in logs and tracebacks otherwise
        return f"S3Credentials(key={self.key!r}, endpoint={self.endpoint!r})"


RUN_CREDENTIALS: contextvars.ContextVar[S3Credentials | None] = contextvars.ContextVar("run_credentials",
                                                                                       default=None)
"""The credentials of the run the current reconcile pass works for (None: the process's own
identity, from its environment). Set only inside `credentials_scope`."""

P = ParamSpec("P")
T = TypeVar("T")


def credentials_scope(fn: Callable[P, T]) -> Callable[P, T]:
    """Run `fn` in a copy of the current context: credentials it sets for its run are gone when
    it returns, so nothing run after it (another run's pass in the same worker thread) uses them."""
    @functools.wraps(fn)
    def scoped(*args: P.args, **kwargs: P.kwargs) -> T:
        return contextvars.copy_context().run(fn, *args, **kwargs)
    return scoped


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI: the S3 endpoint from the environment and, inside a run's pass,
    the run's credentials. A run's S3 keys open only S3: another object store would be read with
    the process's own identity, which a run that names its credentials must never get."""
    creds = RUN_CREDENTIALS.get()
    if not uri.startswith(("s3://", "s3a://")):
        if creds is not None and is_object_store(uri):
            raise PermissionError(f"{uri}: the run's credentials are S3 keys; other object stores are "
                                  "not read on its behalf")
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if creds is None:
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    client: dict[str, Any] = {"endpoint_url": creds.endpoint or endpoint}
    if creds.region:
        client["region_name"] = creds.region
    return {"key": creds.key, "secret": creds.secret, "token": creds.token,
            "client_kwargs": {k: v for k, v in client.items() if v}}


def summarise_error(exc: BaseException) -> str:
    """What a user may read of a storage error (conditions, events): its kind, not its text. An
    object store's error text names endpoints, hosts, request ids and sometimes keys of other
    tenants' paths; the operator logs the whole error, and users see the code the store answered
    (AccessDenied, NoSuchBucket, ...) or what kind of failure it was."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict) and response["Error"].get("Code"):
        return f"the store answered {response['Error']['Code']}"
    for kind, said in ((PermissionError, "access denied"), (FileNotFoundError, "not found"),
                       (TimeoutError, "timed out"), (ConnectionError, "cannot connect to the store")):
        if isinstance(exc, kind):
            return said
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return summarise_error(cause)
    name = type(exc).__name__
    return "cannot connect to the store" if "Connect" in name or "Endpoint" in name else f"storage error ({name})"
