"""What a platform team allows the CptRuns of its tenants: images, pools, tolerations, Secrets,
S3 endpoints.

Permission to create a CptRun is permission to start pods: with no limits a tenant picks any
trainer image (which then reads every Secret its pod mounts), any Secret of the namespace, any
pool and taint, and any S3 endpoint the operator then talks to. The platform team sets these
lists once, as the chart's `tenancy` values; the chart hands them to two checks that must agree:

- at `kubectl apply`, a ValidatingAdmissionPolicy renders them into CEL (charts/.../tenancy.yaml),
  so a refused run is never stored;
- in the operator, `policy.tenancy.refusals` checks every attempt before it starts (a run stored
  before the policy, or on a cluster without admission policies) and the Secret's endpoint,
  which admission cannot see (SpecValid=False, reason NotAllowed).

An empty list allows everything of its kind, so an install without `tenancy` values behaves as
before. tests/unit/policy/test_tenancy.py runs the same cases through both checks.
"""
from __future__ import annotations

import json
from typing import Mapping

from pydantic import Field

from .base import SpecModel

TENANCY_ENV = "CPT_TENANCY"
"""The operator's environment variable holding the policy as JSON (the chart's `tenancy` values)."""


class TenancyPolicy(SpecModel):
    images: list[str] = Field(default_factory=list)
    """Prefixes a run's `resources.image` must start with: a registry (`registry.example.com/`), a
    repository (`…/cpt-trainer:`) or one image by digest (`…/cpt-trainer@sha256:…`). The chart's
    own trainer image (a run naming none) is always allowed."""
    secrets: list[str] = Field(default_factory=list)
    """Names a run's `resources.s3SecretRef` may take."""
    require_s3_secret: bool = False
    """Every run names an `s3SecretRef`: the operator then never reads or writes a run's storage
    with its own identity."""
    node_selectors: dict[str, list[str]] = Field(default_factory=dict)
    """Pools: for each label key a run may select on, the values it may take. When set, a
    `resources.nodeSelector` key not listed here is refused (a run may still select none)."""
    tolerations: list[str] = Field(default_factory=list)
    """Taint keys a run may tolerate; a toleration without a key (tolerate every taint) is refused."""
    endpoints: list[str] = Field(default_factory=list)
    """S3 endpoints (`https://s3.example.com`, scheme and host, optional port) a run's Secret may
    send the operator and the trainers to (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3). A Secret
    naming none uses the operator's and the pods' default endpoint, which is allowed."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TenancyPolicy":
        raw = env.get(TENANCY_ENV, "").strip()
        return cls.model_validate(json.loads(raw)) if raw else cls()


def normalise_endpoint(url: str) -> str:
    """`HTTPS://Host:443/` and `https://host:443` are one endpoint: compare scheme and host
    case-insensitively, without a trailing slash."""
    scheme, sep, rest = url.strip().partition("://")
    host, _, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}" + (f"/{path.rstrip('/')}" if path.rstrip("/") else "")
