"""Running pods on the real node from a test: the pod spec pieces and waits that
test_real_node.py and test_pod_network.py share."""

from __future__ import annotations

from typing import Any

RESTRICTED = {  # what Pod Security "restricted" asks of a container
    "runAsNonRoot": True, "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


def wait_finished(kube: Any, namespace: str, name: str, timeout: float = 180) -> str:
    """The pod's phase once it is Succeeded or Failed."""
    def done() -> str | None:
        phase = kube.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}")
        return phase if phase in ("Succeeded", "Failed") else None

    return str(kube.wait_for(done, f"pod {name} to finish on the real node", timeout=timeout))


def run_pod(kube: Any, node: Any, namespace: str, name: str, container: dict[str, Any],
            timeout: float = 180, pod_spec: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], str]:
    """Run one container to its end on the real node: (phase, pod, logs). ``pod_spec`` adds to
    (or overrides) the pod's spec; the service account token is not mounted unless it says so."""
    kube.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
        "spec": {**node.placement, "restartPolicy": "Never", "automountServiceAccountToken": False,
                 "containers": [{"name": "main", "imagePullPolicy": "Never", **container}],
                 **(pod_spec or {})},
    })
    phase = wait_finished(kube, namespace, name, timeout)
    return phase, kube.kubectl_json("get", "pod", name, "-n", namespace), \
        kube.kubectl("logs", name, "-n", namespace)
