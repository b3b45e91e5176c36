"""Fixtures for the chart tests: promtool and amtool from the test cluster's cache
(tests/cluster/build.sh builds them when missing; CPT_NO_BUILD=1 fails instead); `helm_bin` is
the test cluster's fixture (tests/e2e/fixtures.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import cluster


def _binary(component: str, name: str) -> Path:
    try:
        cluster.ensure_binaries([component])
    except cluster.MissingBinaryError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Path(cluster.binary(name))


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _binary("prometheus", "promtool")


@pytest.fixture(scope="session")
def amtool() -> Path:
    return _binary("prometheus", "amtool")
