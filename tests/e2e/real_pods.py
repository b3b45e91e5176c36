"""Running pods on the real node from a test: the pod spec pieces and waits that
test_real_node.py and test_pod_network.py share, and the two-node CptRun with its inputs in S3
that test_real_recovery.py runs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from cpt_api.manifest import MANIFEST
from tests.cluster.cluster import S3Server
from tests.integration.harness import forgetting_files

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


RUN = "two-pods"
RESTRICTED_NS = {"pod-security.kubernetes.io/enforce": "restricted"}


def new_namespace(kube: Any, prefix: str) -> str:
    return str(kube.create_namespace(f"{prefix}-{uuid.uuid4().hex[:6]}", RESTRICTED_NS))


def upload_inputs(s3: S3Server, bucket: str, tmp: Path, model: Path, corpora: dict[str, Path]) -> str:
    """The base model, the training data and the evaluation sets, in S3 as a user keeps them."""
    fs = s3.filesystem()
    root = f"{bucket}/inputs"
    fs.put(str(model) + "/", f"{root}/base/", recursive=True)
    texts = sorted(Path(corpora["domain"]).glob("*.txt"))
    for path in texts:
        fs.put(str(path), f"{root}/legal/{path.name}")
    files = forgetting_files(tmp, texts)
    for name in ("code_train", "code_eval", "legal_eval"):
        fs.put(str(files[name]), f"{root}/{files[name].name}")
    return f"s3://{root}"


def two_node_run(inputs: str, bucket: str, placement: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "baseModel": {"uri": f"{inputs}/base", "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{inputs}/legal/*.txt", "weight": 0.8},
            {"name": "code", "role": "replay", "uri": f"{inputs}/code-train.jsonl", "format": "jsonl",
             "weight": 0.2},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmupSteps": 4, "decay": "cosine"},
        "budget": {"steps": 60},
        "training": {"microBatchSize": 2, "gradAccumulation": 2},
        "checkpoint": {"uri": f"s3://{bucket}/runs/{RUN}", "every": 10, "keep": 100},
        "evaluation": {"every": 10, "suites": [
            {"name": "legal", "kind": "domain", "uri": f"{inputs}/legal-eval.jsonl", "maxSamples": 4},
            {"name": "general", "kind": "general", "uri": f"{inputs}/code-eval.jsonl", "maxSamples": 4}]},
        "gates": [{"name": "forgetting", "suite": "general", "baseline": "base", "threshold": 1.0,
                   "relative": True, "action": "rollback", "rollbackTo": "lastGood"}],
        "resources": {"nodes": 2, "gpusPerNode": 0, "nodeSelector": placement["nodeSelector"],
                      "tolerations": placement["tolerations"], "s3SecretRef": "s3-credentials",
                      "stopGraceSeconds": 60, "scratch": "2Gi"},  # S3 saves stage on the sized work volume
    }
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": RUN}, "spec": spec}


def manifests(s3: S3Server, bucket: str, attempt: int) -> list[str]:
    """Checkpoints of an attempt whose manifest is written (the last file of a save)."""
    prefix = f"runs/{RUN}/attempt-{attempt:03d}/"
    keys = [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return sorted(k.split("/")[-2] for k in keys if k.endswith("/" + MANIFEST))


def container_id(pod: dict[str, Any]) -> str | None:
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        if cs.get("name") == "trainer" and (cs.get("state") or {}).get("running"):
            return str(cs["containerID"]).split("://", 1)[1]
    return None
