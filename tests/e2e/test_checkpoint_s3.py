"""Bases and checkpoints on a real S3 server (versitygw): 4 FSDP ranks of one "node" start from
a base in S3 and write checkpoints there, 4 ranks restore one, the export tool serves it; a
checkpoint root claimed by one CptRun is refused to a second one.

The trainer and the export tool get the endpoint and credentials from the standard AWS
environment variables (as in test_data_s3.py); the spec names only `s3://` URIs. The base is
downloaded once for the node (one GET a file, in the server's access log) under the node's lock,
hashed on the way, and each rank reads only its rows from that copy. Every rank uploads its own
shards from a local staging directory, rank 0 PUTs the block table and then the manifest. A
restore reads each rank's shards straight from the bucket, verified block by block: about a
quarter of the checkpoint per rank, and no shard lands in the node's cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch

from cpt_api.manifest import BLOCKS, PINNED, RUN_RECORD, STARTED, checkpoint_name
from cpt_api.tenancy import TENANCY_ENV
from cpt_trainer import checkpoint
from cpt_trainer.load.node_copy import copy_path, digest
from cpt_trainer.model import load_checkpoint_model

from tests.conftest import build_tiny_model
from tests.e2e.operator_harness import (OperatorProcess, condition, events as run_events, get_run,
                                        install_crd, job_names, operator_env, status_of)
from tests.e2e.test_operator import cptrun
from tests.integration.harness import events, log_tail, of, run, tiny_spec, write_config

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(900)]

RANKS = 4


def test_four_ranks_load_an_s3_base_once_and_restore_a_quarter_each_straight_from_s3(
        s3_server: Any, s3_bucket: str, tmp_path: Path, corpora: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CPT_CACHE_DIR", str(cache))
    staging = tmp_path / "tmp"  # where ranks stage files before uploading them
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    # big enough that its shards, not what every rank reads (DCP's metadata, AdamW's step counts
    # and hyperparameters: about 1 MB here), make up most of a checkpoint
    model = build_tiny_model(tmp_path / "base", hidden=384, layers=4)
    s3_server.filesystem().put(f"{model}/", f"{s3_bucket}/base/", recursive=True)
    base = f"s3://{s3_bucket}/base"
    root = f"s3://{s3_bucket}/runs/r/checkpoints"
    spec = tiny_spec(model, corpora, baseModel={"uri": base, "format": "hf"}, budget={"steps": 2},
                     checkpoint={"every": 1, "keep": 10}, schedule={"warmupSteps": 1},
                     training={"microBatchSize": 1, "gradAccumulation": 1,
                               "parallelism": {"strategy": "fsdp", "collectiveTimeoutSeconds": 120}})

    # Four ranks of one node start from the S3 base: one download, verified bytes.
    first = write_config(tmp_path, spec, attempt=1, checkpoints=f"{root}/attempt-001")
    assert run(first, nproc=RANKS, timeout=400) == 0, log_tail(first)
    started = of("started", events(first))[0]
    base_files = sorted(p.name for p in model.iterdir())
    gets = Counter(r.key for r in s3_server.requests() if r.key.startswith("base/"))
    assert gets == Counter({f"base/{name}": 1 for name in base_files})
    copy = copy_path(base)
    assert sorted(p.name for p in copy.iterdir()) == base_files
    assert started.base_sha256 == digest(str(model)) == digest(str(copy))
    assert json.loads(Path(f"{copy}.verified.json").read_text())["digest"] == started.base_sha256
    tensors = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert len(started.loaded_bytes) == RANKS
    for loaded in started.loaded_bytes:  # each rank's rows, read from the node's copy
        assert loaded == pytest.approx(tensors / RANKS, rel=0.1)

    valid, problems = checkpoint.list_checkpoints(f"{root}/attempt-001")  # deep: every sha256
    assert problems == []
    assert [name for name, _ in valid] == [checkpoint_name(1), checkpoint_name(2)]
    for _, manifest in valid:
        assert {BLOCKS, "model/__0_0.distcp", "model/__3_0.distcp", "optimizer/__3_0.distcp",
                "data-rank00003.json", "rng-rank00003.json", "config.json"} <= set(manifest.files)
    assert not list(staging.glob("cpt-ckpt-*")), "a rank left its upload staging behind"

    # Four ranks resume the full state straight from the bucket, saving every step and keeping
    # one: retention deletes on S3 too.
    step1 = f"{root}/attempt-001/{checkpoint_name(1)}"
    shards = sum(e.size for rel, e in checkpoint.read_manifest(step1).files.items() if rel.endswith(".distcp"))
    second = write_config(tmp_path, {**spec, "budget": {"steps": 3}, "checkpoint": {"every": 1, "keep": 1}},
                          attempt=2, checkpoints=f"{root}/attempt-002", restore_from=step1,
                          restore_mode="fullState")
    assert run(second, nproc=RANKS, timeout=400) == 0, log_tail(second)
    started = of("started", events(second))[0]
    assert (started.step, started.world_size) == (1, RANKS)
    for loaded in started.loaded_bytes:  # its model and optimizer shards, and what all ranks read
        assert loaded == pytest.approx(shards / RANKS, rel=0.1)
    cached = Path(checkpoint.local_path(step1))
    assert not list(cached.rglob("*.distcp")), "a restore downloaded shards into the node cache"
    assert sorted(e.step for e in of("progress", events(second))) == [2, 3]
    (name, resumed), = checkpoint.list_checkpoints(f"{root}/attempt-002")[0]
    assert name == checkpoint_name(3)
    assert resumed.lineage.restore_mode == "fullState"  # parent: step 2, pruned (keep 1)
    assert resumed.lineage.parent == f"{root}/attempt-002/{checkpoint_name(2)}"
    left = _keys(s3_server.client(), s3_bucket, "runs/r/checkpoints/attempt-002/")
    assert {k.split("/")[4] for k in left} == {checkpoint_name(3), STARTED}  # and the attempt's start record

    # `cptctl export s3://...` serves the checkpoint from a verified copy on this node.
    out = tmp_path / "served"
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "export", step1,
                           "--to", str(out)], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    manifest = checkpoint.read_manifest(step1)
    verified = json.loads(Path(f"{cached}.verified.json").read_text())
    assert verified == {rel: entry.sha256 for rel, entry in manifest.files.items()  # no optimizer state
                        if not rel.startswith("optimizer/")}
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        served = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        saved = load_checkpoint_model(str(cached)).eval()(input_ids=ids).logits
    assert torch.equal(served, saved)


@pytest.mark.cluster
@pytest.mark.prometheus
def test_a_second_cptrun_on_a_claimed_checkpoint_uri_gets_a_condition_and_no_job(
        kube_cluster: Any, prometheus: Any, s3_server: Any, s3_bucket: str, namespace: str,
        tmp_path: Path) -> None:
    kube = kube_cluster
    install_crd(kube)
    operator = OperatorProcess(operator_env(kube, prometheus, s3_server), tmp_path / "operator.log").start()
    try:
        shared = {"uri": f"s3://{s3_bucket}/runs/shared", "every": 10}
        kube.apply(cptrun("first", s3_bucket, checkpoint=shared), namespace=namespace)
        kube.wait_for(lambda: job_names(kube, namespace, "first") == ["first-a1"], "job first-a1", timeout=30)
        uid = get_run(kube, namespace, "first")["metadata"]["uid"]
        record = json.loads(s3_server.filesystem().cat_file(f"{s3_bucket}/runs/shared/{RUN_RECORD}"))
        assert record == {"uid": uid, "name": "first", "namespace": namespace}

        kube.apply(cptrun("second", s3_bucket, checkpoint=shared), namespace=namespace)

        def refused(ns: str, name: str) -> dict[str, Any] | None:
            cond = condition(status_of(kube, ns, name), "SpecValid")
            return cond if cond.get("status") == "False" else None

        cond = kube.wait_for(lambda: refused(namespace, "second"), "second run refused", timeout=30)
        assert cond["reason"] == "CheckpointUriInUse"
        assert f"{namespace}/first (uid {uid})" in cond["message"]
        assert job_names(kube, namespace, "second") == []
        assert "CheckpointUriInUse" in {e["reason"] for e in run_events(kube, namespace, "second")}

        # another team's run on the same location learns that it is taken, not whose it is
        other = kube.create_namespace(f"t-{uuid.uuid4().hex[:10]}")
        try:
            kube.apply(cptrun("third", s3_bucket, checkpoint=shared), namespace=other)
            taken = kube.wait_for(lambda: refused(other, "third"), "third run refused", timeout=30)
            assert taken["reason"] == "CheckpointUriInUse" and "is taken" in taken["message"]
            assert namespace not in taken["message"] and uid not in taken["message"], taken["message"]
            assert job_names(kube, other, "third") == []
        finally:
            kube.kubectl_result("delete", "namespace", other, "--wait=false")

        # the API server keeps checkpoint.uri as it was created
        moved = kube.kubectl_result("patch", "cptrun", "first", "-n", namespace, "--type", "merge", "-p",
                                    json.dumps({"spec": {"checkpoint": {"uri": f"s3://{s3_bucket}/runs/elsewhere"}}}))
        assert moved.returncode != 0 and "checkpoint.uri is immutable" in moved.stderr, moved.stderr
        kept = kube.kubectl_result("patch", "cptrun", "first", "-n", namespace, "--type", "merge", "-p",
                                   json.dumps({"spec": {"checkpoint": {"keep": 3}}}))
        assert kept.returncode == 0, kept.stderr
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.tail(100)}")


@pytest.mark.cluster
@pytest.mark.prometheus
def test_the_operator_reads_and_pins_a_runs_storage_with_the_runs_own_secret(
        kube_cluster: Any, prometheus: Any, s3_server: Any, s3_bucket: str, namespace: str,
        tmp_path: Path) -> None:
    """The operator's own S3 identity owns no bucket; the run's Secret holds the keys that reach
    its bucket (as the trainer pods mount it). Everything the operator does in the run's storage
    goes through the Secret: claim, listing, records, pins. A run whose Secret cannot be read is
    refused with a condition naming it and started with no other identity."""
    from tests.e2e.test_operator import BASE, GOOD, TrainerMetrics, write_checkpoint

    kube = kube_cluster
    install_crd(kube)
    s3_server.create_user("cpt-operator-own", "cpt-operator-own-secret")
    own = s3fs.S3FileSystem(key="cpt-operator-own", secret="cpt-operator-own-secret",
                            client_kwargs={"endpoint_url": s3_server.endpoint, "region_name": s3_server.REGION})
    with pytest.raises(PermissionError):  # the premise: the operator's identity cannot read the bucket
        own.ls(s3_bucket)
    kube.kubectl("create", "secret", "generic", "team-s3", "-n", namespace,
                 *(f"--from-literal={k}={s3_server.env[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                      "AWS_ENDPOINT_URL")))
    kube.kubectl("create", "secret", "generic", "no-secret-key", "-n", namespace,
                 f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.key}")
    kube.kubectl("create", "secret", "generic", "elsewhere", "-n", namespace,
                 *(f"--from-literal={k}={s3_server.env[k]}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
                 "--from-literal=AWS_ENDPOINT_URL=http://169.254.169.254:80")
    env = {**operator_env(kube, prometheus, s3_server),
           **s3_server.env_of("cpt-operator-own", "cpt-operator-own-secret"),
           TENANCY_ENV: json.dumps({"endpoints": [s3_server.endpoint]})}  # the platform team's one store
    operator = OperatorProcess(env, tmp_path / "operator.log").start()
    trainer = None
    try:
        resources = {"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "h100"}}
        kube.apply(cptrun("owned", s3_bucket, resources={**resources, "s3SecretRef": "team-s3"}), namespace=namespace)
        kube.wait_for(lambda: job_names(kube, namespace, "owned") == ["owned-a1"], "job owned-a1", timeout=30)
        uid = get_run(kube, namespace, "owned")["metadata"]["uid"]
        fs = s3_server.filesystem()
        assert json.loads(fs.cat_file(f"{s3_bucket}/runs/owned/{RUN_RECORD}"))["uid"] == uid

        write_checkpoint(s3_server, s3_bucket, "owned", 1, 10, {"general.perplexity": 10.2, "legal.perplexity": 25.0})
        trainer = TrainerMetrics(prometheus, "owned", namespace, 1)
        trainer.set_base(BASE)
        trainer.evaluated(10, {"general.perplexity": 10.2, "legal.perplexity": 25.0})
        kube.wait_for(lambda: status_of(kube, namespace, "owned").get("lastGoodCheckpoint") == GOOD,
                      "the checkpoint listed and judged good", timeout=30)
        assert [c["name"] for c in status_of(kube, namespace, "owned")["checkpoints"]] == [GOOD]
        kube.wait_for(lambda: GOOD in json.loads(fs.cat_file(f"{s3_bucket}/runs/owned/{PINNED}"))["names"],
                      "the good checkpoint pinned", timeout=30)

        for run, secret, cause in (("missing", "no-such-secret", "does not exist"),
                                   ("keyless", "no-secret-key", "has no AWS_SECRET_ACCESS_KEY"),
                                   ("elsewhere", "elsewhere", "names an S3 endpoint that is not allowed")):
            kube.apply(cptrun(run, s3_bucket, resources={**resources, "s3SecretRef": secret}), namespace=namespace)

            def refused(run: str = run) -> dict[str, Any] | None:
                cond = condition(status_of(kube, namespace, run), "SpecValid")
                return cond if cond.get("status") == "False" else None

            cond = kube.wait_for(refused, f"{run} refused", timeout=30)
            assert cond["reason"] == ("NotAllowed" if run == "elsewhere" else "S3SecretUnreadable")
            assert f"Secret {namespace}/{secret}" in cond["message"] and cause in cond["message"]
            assert "169.254" not in cond["message"]  # the host a tenant named is not echoed back
            assert job_names(kube, namespace, run) == []
            assert not fs.exists(f"{s3_bucket}/runs/{run}/{RUN_RECORD}")
    finally:
        if trainer is not None:
            trainer.close()
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.tail(100)}")


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
