"""How the spec's storage URIs are opened: the S3 endpoint comes from the standard AWS environment.

The spec holds only `s3://bucket/key` URIs; endpoint and credentials come from the standard AWS
environment (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), which a pod gets from a Secret. s3fs 2026.9 with aiobotocore 3.10 /
botocore 1.43 honours all of them by itself (checked against versitygw in
tests/e2e/test_data_s3.py); the endpoint is still passed explicitly because older s3fs /
aiobotocore pairings ignore AWS_ENDPOINT_URL and would silently talk to AWS instead.

One home for the trainer (data sources, caches) and the operator (the memory planner reading a
base's config.json): both must reach the same store the same way.
"""
from __future__ import annotations

import os
from typing import Any

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


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI: the S3 endpoint from the environment, nothing else."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
