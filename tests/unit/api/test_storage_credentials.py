"""The storage options of a run's pass: its own S3 keys when it names them, the process's own
identity otherwise, and one fsspec filesystem per identity."""
from __future__ import annotations

from typing import Any

import fsspec
import pytest

from cpt_api.storage import RUN_CREDENTIALS, S3Credentials, credentials_scope, storage_options

TEAM_A = S3Credentials(key="team-a", secret="a-secret")
TEAM_B = S3Credentials(key="team-b", secret="b-secret", token="b-token", endpoint="http://b.store:9000",
                       region="eu-west-1")


@pytest.fixture(autouse=True)
def operator_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://operator.store:9000")


@credentials_scope
def options_as(creds: S3Credentials | None, uri: str) -> dict[str, Any]:
    RUN_CREDENTIALS.set(creds)
    return storage_options(uri)


def test_without_run_credentials_only_the_endpoint_is_passed() -> None:
    assert storage_options("s3://bucket/runs/r") == {"client_kwargs": {"endpoint_url": "http://operator.store:9000"}}
    assert storage_options("gs://bucket/runs/r") == {}


@pytest.mark.parametrize("creds, expected", [
    (TEAM_A, {"key": "team-a", "secret": "a-secret", "token": None,
              "client_kwargs": {"endpoint_url": "http://operator.store:9000"}}),
    (TEAM_B, {"key": "team-b", "secret": "b-secret", "token": "b-token",
              "client_kwargs": {"endpoint_url": "http://b.store:9000", "region_name": "eu-west-1"}}),
], ids=["keys only: the operator's endpoint", "keys, token, endpoint and region of the Secret"])
def test_a_runs_credentials_are_passed_to_s3(creds: S3Credentials, expected: dict[str, Any]) -> None:
    assert options_as(creds, "s3://bucket/runs/r") == expected


def test_a_runs_s3_keys_never_open_another_object_store_with_the_operators_identity() -> None:
    with pytest.raises(PermissionError, match="gs://bucket/base"):
        options_as(TEAM_A, "gs://bucket/base")
    assert options_as(TEAM_A, "/models/base") == {}  # a path is never opened on a cluster


def test_credentials_set_in_a_scope_are_gone_when_it_returns() -> None:
    options_as(TEAM_A, "s3://bucket")
    assert RUN_CREDENTIALS.get() is None
    assert "key" not in storage_options("s3://bucket")


def test_each_identity_gets_its_own_cached_filesystem() -> None:
    pytest.importorskip("s3fs")
    a, b, own = (fsspec.filesystem("s3", **options_as(c, "s3://bucket")) for c in (TEAM_A, TEAM_B, None))
    assert len({id(a), id(b), id(own)}) == 3
    assert (a.key, b.key, own.key) == ("team-a", "team-b", None)
    assert fsspec.filesystem("s3", **options_as(TEAM_A, "s3://bucket")) is a  # reused by the same run


@pytest.mark.parametrize("data, missing", [
    ({"AWS_SECRET_ACCESS_KEY": "s"}, "AWS_ACCESS_KEY_ID"),
    ({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": ""}, "AWS_SECRET_ACCESS_KEY"),
], ids=["no access key", "an empty secret key"])
def test_a_secret_without_its_keys_is_refused_by_name(data: dict[str, str], missing: str) -> None:
    with pytest.raises(KeyError, match=missing):
        S3Credentials.from_env(data)


def test_the_secret_key_stays_out_of_logs() -> None:
    creds = S3Credentials.from_env({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "do-not-log",
                                    "AWS_ENDPOINT_URL": "http://s3:9000"})
    assert creds.endpoint == "http://s3:9000" and "do-not-log" not in repr(creds)
