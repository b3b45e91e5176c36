"""Fixtures for the chart tests: the helm and promtool binaries of the test cluster's cache
(tests/cluster/build.sh builds them when missing; CPT_NO_BUILD=1 fails instead)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_CLUSTER_PY = Path(__file__).resolve().parents[1] / "cluster" / "cluster.py"


def _cluster_module():  # type: ignore[no-untyped-def]
    # The same module object tests/e2e/fixtures.py uses, whichever way tests/ is on sys.path.
    try:
        from tests.cluster import cluster
        return cluster
    except ImportError:
        name = "cpt_test_cluster"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, _CLUSTER_PY)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]


cluster = _cluster_module()


def _binary(component: str, name: str) -> Path:
    try:
        cluster.ensure_binaries([component])
    except cluster.MissingBinaryError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Path(cluster.binary(name))


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return _binary("helm", "helm")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _binary("prometheus", "promtool")


@pytest.fixture(scope="session")
def amtool() -> Path:
    return _binary("prometheus", "amtool")
