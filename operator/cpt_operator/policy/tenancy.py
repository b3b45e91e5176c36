"""Does a run stay within its platform team's allow-lists (`api.tenancy.TenancyPolicy`)? Pure.

The same rules are rendered into the chart's ValidatingAdmissionPolicy; this copy checks what
admission cannot (the endpoint inside a Secret) and what admission did not see (runs stored before
the policy, clusters without admission policies).
"""
from __future__ import annotations

from cpt_api.spec import CptRunSpec
from cpt_api.tenancy import TenancyPolicy, normalise_endpoint


def refusals(spec: CptRunSpec, policy: TenancyPolicy) -> list[str]:
    """Each way `spec` leaves the policy, as a sentence naming the field and what is allowed."""
    res, out = spec.resources, []
    if policy.images and res.image and not any(res.image.startswith(p) for p in policy.images):
        out.append(f"resources.image {res.image} is not allowed (allowed: images starting with "
                   f"{_listed(policy.images)}, or none for the default trainer image)")
    if policy.require_s3_secret and not res.s3_secret_ref:
        out.append("resources.s3SecretRef is required: the platform team allows a run's storage to "
                   "be reached only with the run's own credentials")
    if policy.secrets and res.s3_secret_ref and res.s3_secret_ref not in policy.secrets:
        out.append(f"resources.s3SecretRef {res.s3_secret_ref} is not allowed (allowed: {_listed(policy.secrets)})")
    if policy.node_selectors:
        for key, value in res.node_selector.items():
            allowed = policy.node_selectors.get(key)
            if allowed is None:
                out.append(f"resources.nodeSelector {key} is not a pool label runs may select on "
                           f"(allowed: {_listed(list(policy.node_selectors))})")
            elif value not in allowed:
                out.append(f"resources.nodeSelector {key}={value} is not allowed (allowed: {_listed(allowed)})")
    if policy.tolerations:
        for tol in res.tolerations:
            if tol.key is None:
                out.append("resources.tolerations: a toleration without a key tolerates every taint, which "
                           f"is not allowed (allowed keys: {_listed(policy.tolerations)})")
            elif tol.key not in policy.tolerations:
                out.append(f"resources.tolerations key {tol.key} is not allowed "
                           f"(allowed: {_listed(policy.tolerations)})")
    return out


def endpoint_refusal(endpoint: str | None, policy: TenancyPolicy, where: str) -> str | None:
    """Why the S3 endpoint a run's Secret names may not be used (None: it may). The endpoint itself
    is not repeated beyond its normalised form, and only the allowed list is spelt out."""
    if not policy.endpoints or endpoint is None:
        return None
    if normalise_endpoint(endpoint) in {normalise_endpoint(e) for e in policy.endpoints}:
        return None
    return f"{where} names an S3 endpoint that is not allowed (allowed: {_listed(policy.endpoints)})"


def _listed(items: list[str]) -> str:
    return ", ".join(items)
