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


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI: the S3 endpoint from the environment, nothing else."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
