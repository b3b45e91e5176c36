"""`evaluation.placement: separate` on the test cluster: the operator evaluates the base and every
checkpoint in Jobs of their own while the trainer's Job trains, reads their records back from S3,
and ends the run only when every checkpoint is judged.

The pods run as in tests/e2e/full_loop.py: kwok nodes, and the test's `Kubelet` starting each
pod's own command on this machine (the trainer under torchrun, each evaluation as
`python -m cpt_trainer --evaluate`), with the pod's env, volumes and S3 Secret.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pytest

from cpt_api.events import Evaluated
from cpt_api.manifest import eval_record_name
from cpt_api.storage import storage_options
from cpt_api.store import list_checkpoints
from tests.e2e.operator_harness import OperatorProcess, condition, job_names, status_of
from tests.e2e.full_loop import Kubelet, s3_secret, trainer_events, until
from tests.integration.harness import forgetting_files

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.slow,
              pytest.mark.timeout(600)]

RUN = "apart"
STEPS = 6


def run_doc(bucket: str, tmp: Path, base: Path, corpora: dict[str, Path]) -> dict[str, Any]:
    files = forgetting_files(tmp, sorted(Path(corpora["domain"]).glob("*.txt")))
    spec = {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.9},
            {"name": "code", "role": "replay", "uri": str(files["code_train"]), "format": "jsonl", "weight": 0.1},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "schedule": {"warmupSteps": 1},
        "budget": {"steps": STEPS},
        "training": {"microBatchSize": 4},
        "checkpoint": {"uri": f"s3://{bucket}/runs/{RUN}", "every": 2, "keep": 100},
        "evaluation": {"every": 2, "placement": "separate", "concurrency": 2, "suites": [
            {"name": "legal", "kind": "domain", "uri": str(files["legal_eval"]), "maxSamples": 4},
            {"name": "general", "kind": "general", "uri": str(files["code_eval"]), "maxSamples": 8}]},
        "gates": [{"name": "forgetting", "suite": "general", "threshold": 0.9, "action": "rollback"}],
        "resources": {"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "h100"},
                      "s3SecretRef": "s3-credentials"},
    }
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": RUN}, "spec": spec}


def test_the_operator_evaluates_every_checkpoint_in_a_job_of_its_own(
        kube_cluster: Any, operator: OperatorProcess, prometheus: Any, s3_server: Any, namespace: str,
        s3_bucket: str, tmp_path: Path, tiny_model_dir: Path, corpora: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = kube_cluster
    for key, value in s3_server.env.items():  # the records are read below as the operator reads them
        monkeypatch.setenv(key, value)
    kube.apply(s3_secret(s3_server), namespace=namespace)
    kube.apply(run_doc(s3_bucket, tmp_path, tiny_model_dir, corpora), namespace=namespace)
    kubelet = Kubelet(kube, prometheus, namespace, f"cpt.mlops.dev/run={RUN}", tmp_path / "node")
    seen: dict[str, dict[str, Any]] = {}

    def ended() -> bool:
        for job in kube.kubectl_json("get", "jobs", "-n", namespace, "-l", f"cpt.mlops.dev/run={RUN}")["items"]:
            seen.setdefault(job["metadata"]["name"], job)
        return status_of(kube, namespace, RUN).get("phase") in ("Succeeded", "Failed")

    try:
        until(kubelet, ended, "the run to end", 420)
        until(kubelet, lambda: all(p.reported for p in kubelet.pods.values()), "every pod to exit", 60)
    finally:
        kubelet.close()
        print(kubelet.tails())

    status = status_of(kube, namespace, RUN)
    assert status["phase"] == "Succeeded", status
    assert condition(status, "Evaluated")["status"] == "True", condition(status, "Evaluated")

    # one Job trained, one Job per checkpoint (and the base) evaluated, each owned by the run
    steps = range(2, STEPS + 1, 2)
    evaluations = {f"{RUN}-ebase", *(f"{RUN}-e1-{s}" for s in steps)}
    assert set(seen) == {f"{RUN}-a1", *evaluations}, sorted(seen)
    for name in evaluations:
        owner = seen[name]["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("CptRun", RUN)
        assert "cpt.mlops.dev/attempt" not in seen[name]["metadata"]["labels"]
    # a Job goes once its record is read
    assert not evaluations & set(job_names(kube, namespace, RUN))

    # the trainer measured nothing; each evaluation wrote its record in S3, once
    trainer = kubelet.attempt(1)
    assert not [e for e in trainer_events(trainer) if isinstance(e, Evaluated)]
    assert sum(1 for p in kubelet.pods.values() if p.attempt == 0) == len(evaluations)
    root = f"s3://{s3_bucket}/runs/{RUN}"
    refs, problems = list_checkpoints(root)
    assert not problems and sorted(r.manifest.step for r in refs) == list(steps)
    fs, path = fsspec.core.url_to_fs(root, **storage_options(root))
    base = json.loads(fs.cat_file(f"{path}/attempt-001/{eval_record_name(0)}"))
    assert base["isBase"] and status["baseMetrics"] == base["metrics"]
    for ref in refs:
        record = json.loads(fs.cat_file(f"{path}/attempt-001/{eval_record_name(ref.manifest.step)}"))
        assert record["checkpoint"] == ref.name.split("/")[1]
        summary = next(c for c in status["checkpoints"] if c["name"] == ref.name)
        assert summary["metrics"] == record["metrics"] and summary["passedGates"]
    assert status["bestCheckpoint"] in {r.name for r in refs} | {"base"}
