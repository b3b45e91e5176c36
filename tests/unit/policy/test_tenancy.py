"""The operator's copy of the platform team's allow-lists: each case of tests/tenancy_cases.py is
refused or allowed as the chart's admission policy decides it on the real API server
(tests/e2e/test_tenancy.py)."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.spec import CptRunSpec
from cpt_api.tenancy import TENANCY_ENV, TenancyPolicy
from cpt_operator.policy.tenancy import endpoint_refusal, refusals
from tests.tenancy_cases import CASES, POLICY
from tests.unit.kube.cases import spec_doc

POLICY_MODEL = TenancyPolicy.model_validate(POLICY)


def _spec(resources: dict[str, Any]) -> CptRunSpec:
    doc = spec_doc()
    doc["resources"] = {"nodes": 1, **resources}
    return CptRunSpec.model_validate(doc)


@pytest.mark.parametrize("resources, refused", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_case_is_refused_or_allowed_by_the_allow_lists(resources: dict[str, Any], refused: str | None) -> None:
    found = refusals(_spec(resources), POLICY_MODEL)
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and refused in found[0] and "allow" in found[0], found


def test_an_empty_policy_allows_everything() -> None:
    wide = {"image": "docker.io/any:1", "nodeSelector": {"x": "y"}, "tolerations": [{"operator": "Exists"}]}
    assert refusals(_spec(wide), TenancyPolicy()) == []
    assert endpoint_refusal("https://anywhere.example", TenancyPolicy(), "Secret") is None


@pytest.mark.parametrize("endpoint, allowed", [
    ("https://s3.team-a.example", True), ("HTTPS://S3.Team-A.example/", True), (None, True),
    ("https://s3.team-b.example", False), ("http://s3.team-a.example", False),
    ("https://s3.team-a.example.evil.io", False), ("https://s3.team-a.example:8443", False),
])
def test_a_secrets_endpoint_must_be_listed(endpoint: str | None, allowed: bool) -> None:
    found = endpoint_refusal(endpoint, POLICY_MODEL, "Secret ns/team-a-s3")
    assert (found is None) == allowed
    if found is not None:  # the user sees which Secret and the allowed list, not the host it named
        assert found.startswith("Secret ns/team-a-s3 names an S3 endpoint") and (endpoint or "") not in found


def test_the_policy_comes_from_the_charts_environment_and_rejects_typos() -> None:
    import json

    assert TenancyPolicy.from_env({TENANCY_ENV: json.dumps(POLICY)}) == POLICY_MODEL
    assert TenancyPolicy.from_env({}) == TenancyPolicy()
    with pytest.raises(ValueError, match="imagess"):
        TenancyPolicy.from_env({TENANCY_ENV: json.dumps({"imagess": ["x/"]})})


def test_a_storage_error_reaches_users_as_its_kind_not_its_text() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from cpt_api.storage import summarise_error

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "bucket team-b-secret-plans"}}, "GetObject")
    assert summarise_error(denied) == "the store answered AccessDenied"
    wrapped = PermissionError("s3://team-b/x: Access Denied")
    wrapped.__cause__ = denied
    assert summarise_error(wrapped) == "access denied"
    assert summarise_error(EndpointConnectionError(endpoint_url="http://10.1.2.3:9000")) == "cannot connect to the store"
    assert summarise_error(OSError(5, "Input/output error: http://10.1.2.3")) == "storage error (OSError)"
