"""Errors no retry fixes, refusals that pass, and requests that must not be lost, against the
real control plane: an object the API server refuses, a full Job quota, a trainer that refuses
its config, a run name that is no DNS label, and resuming a stopped run. Pods are kwok's: the test
plays the trainer's end."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpt_api.exit_codes import EXIT_REFUSED
from tests.e2e.operator_harness import (OperatorProcess, condition, events, get_run, job_names,
                                        status_of, trainer_config)
from tests.e2e.test_operator import cptrun, write_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.timeout(180)]

POOL = {"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "h100"}}


def running_pod(kube: Any, namespace: str, selector: str) -> dict[str, Any]:
    return kube.wait_for(lambda: next((p for p in kube.pods(namespace, selector)
                                       if p["status"].get("phase") == "Running"), None),
                         f"a running pod ({selector})", timeout=30)


def test_an_object_the_api_server_refuses_is_reported_until_the_spec_is_fixed(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("greedy", s3_bucket, resources=POOL | {"cpu": "lots"}), namespace=namespace)

    def refused() -> dict[str, Any] | None:
        cond = condition(status_of(kube, namespace, "greedy"), "SpecValid")
        return cond if cond.get("status") == "False" else None

    cond = kube.wait_for(refused, "SpecValid=False", timeout=30)
    assert cond["reason"] == "InvalidObject" and "quantities must match" in cond["message"], cond
    assert cond["observedGeneration"] == 1 and job_names(kube, namespace, "greedy") == []
    assert "InvalidObject" in {e["reason"] for e in events(kube, namespace, "greedy")}

    kube.kubectl("patch", "cptrun", "greedy", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"resources": {"cpu": "2"}}}))
    kube.wait_for(lambda: job_names(kube, namespace, "greedy") == ["greedy-a1"], "job after the fix", timeout=30)
    # the ConfigMap the refused try left behind now holds the fixed spec
    assert trainer_config(kube, namespace, "greedy-a1")["spec"]["resources"]["cpu"] == "2"
    kube.wait_for(lambda: condition(status_of(kube, namespace, "greedy"), "SpecValid").get("status") == "True",
                  "SpecValid=True", timeout=30)


def test_a_full_job_quota_holds_the_start_with_a_condition_until_it_frees(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "jobs"},
                "spec": {"hard": {"count/jobs.batch": "0"}}}, namespace=namespace)
    kube.apply(cptrun("quota", s3_bucket, resources=POOL), namespace=namespace)

    def held() -> dict[str, Any] | None:
        cond = condition(status_of(kube, namespace, "quota"), "Progressing")
        return cond if cond.get("reason") == "CreateForbidden" else None

    cond = kube.wait_for(held, "Progressing=False, CreateForbidden", timeout=30)
    assert cond["status"] == "False" and "exceeded quota" in cond["message"] and "trying again in" in cond["message"]
    status = status_of(kube, namespace, "quota")
    assert condition(status, "SpecValid").get("status") != "False", status  # not the spec's fault
    assert job_names(kube, namespace, "quota") == []
    assert "CreateForbidden" in {e["reason"] for e in events(kube, namespace, "quota")}
    # no ConfigMap or Service of the refused try is left behind
    assert kube.kubectl_json("get", "configmaps,services", "-n", namespace, "-l",
                             "cpt.mlops.dev/run=quota")["items"] == []

    kube.kubectl("delete", "resourcequota", "jobs", "-n", namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "quota") == ["quota-a1"], "job once the quota is gone",
                  timeout=60)
    kube.wait_for(lambda: condition(status_of(kube, namespace, "quota"), "Progressing").get("status") == "True",
                  "Progressing=True", timeout=30)


def test_a_trainer_that_refused_its_config_fails_the_run_without_a_restart(
        kube_cluster: Any, operator: OperatorProcess, namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("picky", s3_bucket, resources=POOL, stopPolicy={"maxAttemptRestarts": 3}), namespace=namespace)
    pod = running_pod(kube, namespace, "cpt.mlops.dev/run=picky")
    now = "2026-12-01T00:00:00Z"
    terminated = {"exitCode": EXIT_REFUSED, "reason": "Error", "startedAt": now, "finishedAt": now,
                  "message": "refused: tokenizer hash does not match tokenizer.version"}
    status = {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "image": pod["spec"]["containers"][0]["image"], "imageID": "", "ready": False,
        "restartCount": 0, "started": False, "state": {"terminated": terminated}}]}
    kube.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                 "--type=merge", "-p", json.dumps({"status": status}))
    kube.wait_for(lambda: status_of(kube, namespace, "picky").get("phase") == "Failed", "run Failed", timeout=30)
    st = status_of(kube, namespace, "picky")
    assert (st["attempt"], st.get("restarts", 0)) == (1, 0)
    assert condition(st, "Failed")["reason"] == "Refused"
    assert "exited with code 2" in st["message"] and "tokenizer hash" in st["message"]
    assert job_names(kube, namespace, "picky") == ["picky-a1"]


def test_a_run_named_with_dots_gets_valid_objects(kube_cluster: Any, operator: OperatorProcess,
                                                  namespace: str, s3_bucket: str) -> None:
    kube = kube_cluster
    kube.apply(cptrun("legal.v2", s3_bucket, resources=POOL), namespace=namespace)
    name = f"legal-v2-{hashlib.sha256(b'legal.v2').hexdigest()[:6]}-a1"
    kube.wait_for(lambda: job_names(kube, namespace, "legal.v2") == [name], f"job {name}", timeout=30)
    assert kube.kubectl_json("get", "service", name, "-n", namespace)["spec"]["clusterIP"] == "None"
    assert trainer_config(kube, namespace, name)["run"] == "legal.v2"
    assert running_pod(kube, namespace, "cpt.mlops.dev/run=legal.v2")["spec"]["subdomain"] == name


def test_cptctl_resumes_a_stopped_run_from_its_newest_checkpoint(
        kube_cluster: Any, operator: OperatorProcess, s3_server: Any, namespace: str, s3_bucket: str,
        tmp_path: Path) -> None:
    kube = kube_cluster

    def cptctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cpt_operator.cli", *args, "-n", namespace,
                               "--kubeconfig", str(kube.kubeconfig)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)

    kube.apply(cptrun("paused", s3_bucket, resources=POOL), namespace=namespace)
    kube.wait_for(lambda: job_names(kube, namespace, "paused") == ["paused-a1"], "job paused-a1", timeout=30)
    newest = write_checkpoint(s3_server, s3_bucket, "paused", 1, 20, {"general.perplexity": 10.0})
    kube.wait_for(lambda: status_of(kube, namespace, "paused").get("lastCheckpoint") == newest,
                  "checkpoint listed in status", timeout=30)
    early = cptctl("resume", "paused")
    assert early.returncode == 2 and "only a Stopped run can be resumed" in early.stderr

    assert cptctl("stop", "paused").returncode == 0
    kube.wait_for(lambda: status_of(kube, namespace, "paused").get("phase") == "Stopped", "run Stopped", timeout=30)
    kube.wait_for(lambda: not job_names(kube, namespace, "paused"), "job deleted after stop", timeout=30)

    resumed = cptctl("resume", "paused")
    assert resumed.returncode == 0, resumed.stderr
    kube.wait_for(lambda: job_names(kube, namespace, "paused") == ["paused-a2"], "attempt 2 after resume", timeout=30)
    config = trainer_config(kube, namespace, "paused-a2")
    assert config["restoreFrom"] == f"s3://{s3_bucket}/runs/paused/{newest}" and config["restoreMode"] == "fullState"
    kube.wait_for(lambda: status_of(kube, namespace, "paused").get("phase") == "Running", "run Running", timeout=30)
    annotations = get_run(kube, namespace, "paused")["metadata"].get("annotations") or {}
    assert "cpt.mlops.dev/resume" not in annotations and "cpt.mlops.dev/stop" not in annotations
