"""A CptRun as a user runs it, every pod in a real container: `helm install` puts the operator on
the real node as a pod (its image, its ServiceAccount, the API server through the in-cluster
config), `kubectl apply` of a two-node run makes it create the ConfigMap, headless Service and
Indexed Job, and the two trainer pods (the trainer image) find each other through the Service's
DNS names, rendezvous with torchrun's c10d, train the tiny model on data in S3, and write their
checkpoints there. Pod Security "restricted" is enforced in both namespaces.

Midway one trainer container is SIGKILLed (a crash, not a stop): the Job fails, and the operator
starts attempt 2 from the last checkpoint in S3, which trains to the end of the budget.

What is not real here (tests/cluster/README.md): the node is one machine's kubelet, so both
"nodes" of the run are pods on the same node; CoreDNS runs as a host process; the `kubernetes`
Service is one DNAT rule instead of kube-proxy; Prometheus finds pods through the harness's
PodDiscovery (Debian's Prometheus has no Kubernetes discovery).
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.api.events import Finished, parse_event
from cpt_operator.api.manifest import MANIFEST
from tests.cluster.cluster import Prometheus, S3Server
from tests.e2e.operator_harness import condition, status_of, trainer_config
from tests.e2e.test_helm_install import helm
from tests.helm import chartlib
from tests.integration.harness import forgetting_files

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.helm, pytest.mark.s3,
              pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(900)]

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


def test_helm_installed_operator_runs_a_two_node_cptrun_in_real_pods_and_resumes_after_a_crash(
        kube_cluster: Any, real_node: Any, helm_bin: Path, operator_image: str, trainer_image: str,
        host_s3: S3Server, host_prometheus: Prometheus, tmp_path: Path, tiny_model_dir: Path,
        corpora: dict[str, Path]) -> None:
    kube = kube_cluster
    system, ns = new_namespace(kube, "cpt-system"), new_namespace(kube, "team")
    bucket = host_s3.create_bucket()
    inputs = upload_inputs(host_s3, bucket, tmp_path, tiny_model_dir, corpora)
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                "stringData": dict(host_s3.env)}, namespace=ns)

    # helm install, as the chart README says, with this machine's images and addresses
    operator_repo, operator_tag = operator_image.rsplit(":", 1)
    trainer_repo, trainer_tag = trainer_image.rsplit(":", 1)
    placement = real_node.placement
    values = {
        "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
        "trainer": {"image": {"repository": trainer_repo, "tag": trainer_tag}},
        "operator": {"namespaces": [ns], "prometheusUrl": host_prometheus.url,
                     "nodeSelector": placement["nodeSelector"], "tolerations": placement["tolerations"]},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    release = "cpt"
    install = helm(helm_bin, kube, "install", release, str(chartlib.CHART), "-n", system,
                   "-f", str(values_file), "--wait", "--timeout", "240s", timeout=300)
    assert install.returncode == 0, install.stderr + kube.kubectl_result(
        "get", "pods", "-n", system, "-o", "wide").stdout
    try:
        (op_pod,) = kube.pods(system, "app.kubernetes.io/component=operator")
        assert op_pod["spec"]["nodeName"] == real_node.name

        run = two_node_run(inputs, bucket, placement)
        kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(run))

        # a crash mid-run: SIGKILL pod 1's trainer once attempt 1 has a checkpoint in S3
        def first_checkpoint() -> list[str] | None:
            return manifests(host_s3, bucket, 1) or None

        kube.wait_for(first_checkpoint, "attempt 1's first checkpoint in S3", timeout=420, interval=0.5)
        pods = {p["metadata"]["name"]: p for p in kube.pods(ns, f"cpt.mlops.dev/run={RUN}")}
        assert sorted(pods) and all(p["spec"]["nodeName"] == real_node.name for p in pods.values())
        victim = next(p for name, p in pods.items() if name.startswith(f"{RUN}-a1-1"))
        cid = container_id(victim)
        assert cid, victim["status"]
        real_node.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        killed_after = manifests(host_s3, bucket, 1)

        def ended() -> dict[str, Any] | None:
            status = status_of(kube, ns, RUN)
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = kube.wait_for(ended, "the run to end", timeout=600, interval=2)
        logs = {p["metadata"]["name"]: kube.kubectl("logs", "-n", ns, p["metadata"]["name"])
                for p in kube.pods(ns, f"cpt.mlops.dev/run={RUN}")}
        assert status["phase"] == "Succeeded", (status, {k: v[-2000:] for k, v in logs.items()},
                                                kube.kubectl("logs", "-n", system, op_pod["metadata"]["name"]))
    finally:
        op_logs = kube.kubectl_result("logs", "-n", system, "-l", "app.kubernetes.io/component=operator",
                                      "--tail", "80").stdout
        print(f"--- operator pod log (tail) ---\n{op_logs}")
        helm(helm_bin, kube, "uninstall", release, "-n", system, "--wait", "--timeout", "60s")

    # attempt 2 resumed from the newest checkpoint attempt 1 had written when it crashed
    assert status["restarts"] == 1 and status["attempt"] == 2, status
    config = trainer_config(kube, ns, f"{RUN}-a2")
    root = f"s3://{bucket}/runs/{RUN}"
    resumed_from = config["restoreFrom"].removeprefix(f"{root}/")
    assert resumed_from in [f"attempt-001/{n}" for n in manifests(host_s3, bucket, 1)]
    assert resumed_from.split("/")[1] >= killed_after[-1], (resumed_from, killed_after)
    assert config["restoreMode"] == "fullState"

    # kubectl logs of the trainer pods is the trainer's own output, from both ranks
    a2 = {k: v for k, v in logs.items() if k.startswith(f"{RUN}-a2-")}
    assert len(a2) == 2, sorted(logs)
    assert all("step" in text for text in a2.values()), a2
    events = [parse_event(m.group(1)) for text in a2.values()
              for m in re.finditer(r" event (\{.*\})$", text, re.M)]
    assert any(isinstance(e, Finished) and e.reason == "budget" and e.step == 60 for e in events), a2

    # the checkpoints and their manifests are in S3; the chosen one is among them
    saved = manifests(host_s3, bucket, 2)
    assert saved and saved[-1] == "step-00000060", saved
    assert status["bestCheckpoint"], status
    attempt_dir, step = status["bestCheckpoint"].split("/")  # attempt-NNN/step-NNNNNNNN
    assert step in manifests(host_s3, bucket, int(attempt_dir.removeprefix("attempt-")))
    # its lineage names the code that wrote it and the evaluation it was measured on
    chosen = json.loads(host_s3.client().get_object(
        Bucket=bucket, Key=f"runs/{RUN}/{status['bestCheckpoint']}/{MANIFEST}")["Body"].read())
    assert chosen["lineage"]["codeVersion"].endswith(f" in {trainer_image}"), chosen["lineage"]
    assert sorted(chosen["lineage"]["evalDigests"]) == ["general", "legal"]
    assert condition(status, "Succeeded")["status"] == "True"
    printed = kube.kubectl("get", "cptruns", "-n", ns)
    assert RUN in printed and "Succeeded" in printed
