"""Pods on the real node: containerd, runc, CNI and the kubelet run what the API server says.

The image is the Debian base that images.sh makes (mmdebstrap + buildah), imported into the
node's containerd; no registry is involved, hence ``imagePullPolicy: Never``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.cluster.cluster import S3Server
from tests.e2e.real_pods import RESTRICTED, run_pod

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.timeout(600)]


def test_a_pod_runs_on_the_real_node_and_its_logs_are_the_containers_output(
        kube_cluster: Any, real_node: Any, namespace: str, base_image: str) -> None:
    phase, pod, logs = run_pod(kube_cluster, real_node, namespace, "hello", {
        "image": base_image,
        "command": ["sh", "-c", 'echo "hello from $(hostname) uid=$(id -u)"; grep PRETTY /etc/os-release'],
    })
    assert phase == "Succeeded", (pod["status"], logs)
    assert pod["spec"]["nodeName"] == real_node.name
    assert "hello from hello uid=0" in logs
    assert "Debian GNU/Linux 12 (bookworm)" in logs
    assert ipaddress.ip_address(pod["status"]["podIP"]) in real_node.subnet


def test_the_kwok_pods_stay_off_the_real_node(kube_cluster: Any, real_node: Any, namespace: str) -> None:
    """Without the toleration a pod never lands on the real node (the operator's tests)."""
    node = kube_cluster.kubectl_json("get", "node", real_node.name)
    assert {"key": "cpt-test/real-node", "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["metadata"]["labels"]["type"] == "real"


def test_the_operator_image_runs_cptctl_as_its_own_user_under_pod_security_restricted(
        kube_cluster: Any, real_node: Any, namespace: str, operator_image: str) -> None:
    kube_cluster.kubectl("label", "namespace", namespace,
                         "pod-security.kubernetes.io/enforce=restricted")
    phase, pod, logs = run_pod(kube_cluster, real_node, namespace, "cptctl", {
        "image": operator_image, "securityContext": RESTRICTED,
        "command": ["sh", "-c", "id; cptctl --help; python -c 'import torch' || echo no torch"],
    })
    assert phase == "Succeeded", (pod["status"], logs)
    assert "uid=10001(cpt) gid=10001(cpt)" in logs
    assert "usage: cptctl" in logs
    assert "no torch" in logs


def test_a_pod_writes_to_the_s3_server_on_the_host_through_the_pod_network(
        kube_cluster: Any, real_node: Any, namespace: str, operator_image: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Pods reach the host's servers at the node's address, over the CNI bridge."""
    s3 = S3Server(tmp_path_factory.mktemp("s3-host"), host=real_node.ip).start()
    try:
        bucket = s3.create_bucket()
        env = [{"name": k, "value": v} for k, v in s3.env.items()]
        phase, pod, logs = run_pod(kube_cluster, real_node, namespace, "s3-writer", {
            "image": operator_image, "securityContext": RESTRICTED, "env": env,
            "command": ["python", "-c",
                        f"import s3fs; s3fs.S3FileSystem().pipe('{bucket}/from-pod.txt', b'written in a pod');"
                        " print('wrote')"],
        })
        assert phase == "Succeeded", (pod["status"], logs)
        body = s3.client().get_object(Bucket=bucket, Key="from-pod.txt")["Body"].read()
        assert body == b"written in a pod"
    finally:
        s3.stop()
