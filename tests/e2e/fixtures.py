"""Fixtures for tests against the real test cluster (tests/cluster/), registered once, by
tests/conftest.py, for every directory that uses them (tests/e2e, tests/faults): a fixture
imported into two conftests is two fixtures, and a session fixture would start twice.

Everything here is lazy: a component starts the first time a test asks for
its fixture and stops at the end of the session. Missing binaries are built
by tests/cluster/build.sh (set CPT_NO_BUILD=1 to fail instead). Logs of every
component stay under the session's temp dir; a failing readiness wait quotes
the last lines.

Session fixtures:  kube_cluster, prometheus, alertmanager, s3_server, helm_bin
Session fixture:   fault_free_loop (the full loop's fault-free run, driven once)
Module fixtures:   operator (the CRD installed and `python -m cpt_operator.kube` running; one
                   per module, so each module's operator state starts afresh)
Module fixtures on the real node: base_image, operator_image (built by images.sh, imported)
Function fixtures: namespace, s3_bucket
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from tests.cluster import cluster


def _ensure(components: list[str]) -> None:
    try:
        cluster.ensure_binaries(components)
    except cluster.MissingBinaryError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.KubeCluster]:
    """A running control plane with kwok nodes (2 × pool=h100 with 8 GPUs, 1 × pool=cpu).

    Attributes: ``kubeconfig`` (Path), ``server`` (URL), ``bin`` (dict of
    binary paths), ``env`` (os.environ + KUBECONFIG); methods ``kubectl(*args,
    input=None)`` -> stdout, ``kubectl_result``, ``kubectl_json``, ``apply``,
    ``wait_for``, ``pods``, ``annotate_pods``.
    """
    _ensure(["kubernetes", "etcd", "kwok"])
    kube = cluster.KubeCluster(tmp_path_factory.mktemp("kube"))
    try:
        kube.start()
    except cluster.ComponentError as exc:
        kube.stop()
        pytest.fail(f"test cluster did not start: {exc}", pytrace=False)
    try:
        yield kube
    finally:
        kube.stop()


@pytest.fixture(scope="session")
def real_node(kube_cluster: cluster.KubeCluster, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
              request: pytest.FixtureRequest):
    """A real node (containerd + runc + CNI + kubelet) registered as ``real-0``, tainted so
    that only pods with ``real_node.placement`` (nodeSelector + toleration) land there;
    ``ip`` (the host's address, where pods reach host servers), ``dns_ip`` (its CoreDNS),
    ``load_image(archive)``, ``ctr(*args)``. See tests/cluster/node.py and podnet.py."""
    from tests.cluster import node

    if os.geteuid() != 0:
        pytest.skip("the real node needs root (namespaces, cgroups, mounts)")
    _ensure(list(node.NODE_COMPONENTS))
    real = node.RealNode(kube_cluster, tmp_path_factory.mktemp("node"))
    try:
        real.start(preload=_trainer_archive(request.session))
    except cluster.ComponentError as exc:
        pytest.fail(f"the real node did not start: {exc}", pytrace=False)
    try:
        yield real
    finally:
        real.stop()


def _trainer_archive(session: pytest.Session) -> list[Path]:
    """The trainer image's archive, when a selected test uses it: imported while the node's
    kubelet starts and the tests before it run, not in that test's setup."""
    if not any("trainer_image" in getattr(item, "fixturenames", ()) for item in session.items):
        return []
    from tests.cluster.images import build_images

    return [build_images("trainer")["trainer"].archive]


@pytest.fixture(scope="module")
def base_image(real_node) -> str:  # type: ignore[no-untyped-def]
    """The Debian base image (images.sh), imported into the real node's containerd; its ref."""
    from tests.cluster.images import build_images

    image = build_images("base")["base"]
    real_node.load_image(image.archive)
    return image.ref


@pytest.fixture(scope="module")
def operator_image(real_node) -> str:  # type: ignore[no-untyped-def]
    """The operator image (operator/Dockerfile on the base), imported into the real node."""
    from tests.cluster.images import build_images

    image = build_images("operator")["operator"]
    real_node.load_image(image.archive)
    return image.ref


@pytest.fixture(scope="session")
def trainer_image(real_node) -> str:  # type: ignore[no-untyped-def]
    """The trainer image (trainer/Dockerfile on the base, torch from PyPI), imported into the
    real node once per session (~6 GB, ~50 s, begun when the node starts); its ref."""
    import time

    from tests.cluster.images import build_images

    image = build_images("trainer")["trainer"]
    start = time.monotonic()
    real_node.load_image(image.archive)  # usually preloaded (real_node): this waits for the rest
    print(f"\ntrainer image {image.ref}: {image.archive.stat().st_size / 2**30:.2f} GiB archive, "
          f"waited {time.monotonic() - start:.0f} s for its import")
    return image.ref


@pytest.fixture
def namespace(kube_cluster: cluster.KubeCluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted after the test."""
    name = kube_cluster.create_namespace(f"t-{uuid.uuid4().hex[:10]}")
    try:
        yield name
    finally:
        kube_cluster.kubectl_result("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Alertmanager]:
    _ensure(["prometheus"])
    am = cluster.Alertmanager(tmp_path_factory.mktemp("alertmanager"))
    try:
        yield am.start()
    finally:
        am.stop()


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Prometheus]:
    """Prometheus scraping every second whatever ``add_target(addr, labels)`` lists.

    ``url``, ``query(promql)`` -> result list, ``wait_for(promql, timeout)``,
    ``add_rules(name, yaml)``, ``reload()``, ``targets()``, ``remove_target``.
    Session-wide: use distinct labels per test, or ``clear_targets()``.
    """
    _ensure(["prometheus"])
    prom = cluster.Prometheus(tmp_path_factory.mktemp("prometheus"))
    try:
        yield prom.start()
    finally:
        prom.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.S3Server]:
    """An S3 server: ``endpoint``, ``key``, ``secret``, ``env`` (AWS_* variables),
    ``client()`` (boto3), ``filesystem()`` (s3fs), ``create_bucket()``."""
    _ensure(["versitygw"])
    s3 = cluster.S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield s3.start()
    finally:
        s3.stop()


@pytest.fixture
def s3_bucket(s3_server: cluster.S3Server) -> Iterator[str]:
    """A fresh, empty bucket; emptied and deleted after the test."""
    name = s3_server.create_bucket()
    try:
        yield name
    finally:
        try:
            s3_server.delete_bucket(name)
        except Exception:  # noqa: BLE001 - cleanup must not mask the test's outcome
            pass


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """Path of the helm binary (``helm --kubeconfig kube_cluster.kubeconfig ...``)."""
    _ensure(["helm"])
    path = cluster.binary("helm")
    subprocess.run([str(path), "version", "--short"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def fault_free_loop(kube_cluster: cluster.KubeCluster, prometheus: cluster.Prometheus, s3_server: cluster.S3Server,
                    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                    corpora: dict[str, Path]) -> Any:
    """The forgetful run (tests/e2e/full_loop.py) driven to its end once a session, by an operator
    of its own: test_operator_full_loop.py asserts on it, the fault suite compares with it."""
    from tests.e2e.full_loop import run_fault_free

    return run_fault_free(kube_cluster, prometheus, s3_server, tmp_path_factory.mktemp("full-loop"),
                          tiny_model_dir, corpora)


@pytest.fixture(scope="module")
def operator(kube_cluster, prometheus, s3_server,  # type: ignore[no-untyped-def]
             tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.e2e.operator_harness import install_crd, running_operator

    install_crd(kube_cluster)
    yield from running_operator(kube_cluster, prometheus, s3_server,
                                tmp_path_factory.mktemp("operator") / "operator.log")


@pytest.fixture(scope="module")
def host_s3(real_node: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.S3Server]:
    """An S3 server on the host's address: pods reach it over the bridge."""
    s3 = cluster.S3Server(tmp_path_factory.mktemp("s3-real"), host=real_node.ip).start()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def host_prometheus(kube_cluster: Any, real_node: Any,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Prometheus]:
    """Prometheus on the host's address (the operator pod queries it), scraping the trainer pods
    it finds by their prometheus.io annotations."""
    prom = cluster.Prometheus(tmp_path_factory.mktemp("prom-real"), host=real_node.ip, discover_pods=kube_cluster)
    try:
        yield prom.start()
    finally:
        prom.stop()
