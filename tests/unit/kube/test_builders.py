"""The objects of one attempt, built without a cluster."""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from cpt_api.exit_codes import EXIT_REFUSED
from cpt_api.status import Overrides
from cpt_api.spec import CptRunSpec, RestoreMode, TokenizerExtensionSpec, TokenizerSpec
from cpt_api.storage import STAGING_DIR_ENV
from cpt_operator.kube.builders import (CONFIG_FILE, RunRef, SpecProblem, attempt_name, checkpoint_root,
                                        trainer_config)
from cpt_operator.kube.launcher import IndexedJobLauncher
from cpt_operator.kube.settings import Settings
from cpt_operator.reconcile import StartAttempt

from .cases import RUN, build_spec, spec_doc

SETTINGS = Settings(trainer_image="registry.example/cpt-trainer:1.0")


def attempt_objects(spec=None, number: int = 2, restore: str | None = "attempt-001/step-00000100"):
    spec = spec or build_spec()
    action = StartAttempt(number, restore, RestoreMode.full_state, Overrides(lr_scale=0.5, replay_delta=0.1),
                          "after rollback 1")
    config = trainer_config(RUN, spec, action, SETTINGS)
    return IndexedJobLauncher(SETTINGS).build(RUN, spec, config)


def pod_spec(job):
    return job["spec"]["template"]["spec"]


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("run, attempt, expected", [
    ("legal-7b", 3, "legal-7b-a3"),
    ("7b-legal", 1, "r7b-legal-{digest}-a1"),
    ("my.run", 2, "my-run-{digest}-a2"),
], ids=["a short run keeps its name", "a run starting with a digit gets a letter in front",
        "a dot becomes a dash"])
def test_attempt_names_are_deterministic_dns_labels(run, attempt, expected):
    digest = hashlib.sha256(run.encode()).hexdigest()[:6]
    assert attempt_name(run, attempt) == expected.format(digest=digest)


@pytest.mark.parametrize("a, b", [("1foo", "r1foo"), ("my.run", "my-run"), ("a.b-c", "a-b.c")],
                         ids=["a letter put in front", "a dot replaced", "dots and dashes swapped"])
def test_names_that_had_to_change_never_collide_with_another_run(a, b):
    assert attempt_name(a, 1) != attempt_name(b, 1)


@pytest.mark.parametrize("run", ["my.run", "7b.legal.v2", "x" * 80 + ".y", "a"],
                         ids=["dots", "a digit and dots", "long with a dot", "one letter"])
def test_every_object_of_an_attempt_has_a_valid_name_for_its_kind(run):
    ref = RunRef(name=run, namespace="ml", uid="u")
    spec = build_spec()
    config = trainer_config(ref, spec, StartAttempt(1023, None, RestoreMode.weights_only, Overrides(), "x"), SETTINGS)
    objects = IndexedJobLauncher(SETTINGS).build(ref, spec, config)
    for obj in objects:  # a Service name is a DNS-1035 label; Job and ConfigMap accept it too
        assert DNS_1035.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63, obj["kind"]
    job = objects[-1]
    assert DNS_1035.match(pod_spec(job)["subdomain"])
    assert len(f"{job['metadata']['name']}-1023") <= 63  # the pod hostname of the last index


def test_a_trainer_config_too_big_for_a_config_map_is_refused_before_any_api_call():
    terms = [f"term-{i:06d}-" + "x" * 40 for i in range(30_000)]
    with pytest.raises(SpecProblem, match=r"ConfigMap holds at most 1,048,576.*tokenizer.extend.terms"):
        extended = TokenizerSpec(extend=TokenizerExtensionSpec(terms=terms))
        attempt_objects(build_spec().model_copy(update={"tokenizer": extended}))


def test_a_long_run_name_is_shortened_with_a_digest_so_pod_hostnames_fit():
    long_a, long_b = "x" * 80 + "a", "x" * 80 + "b"
    name_a, name_b = attempt_name(long_a, 12), attempt_name(long_b, 12)
    assert name_a != name_b and name_a.endswith("-a12")
    assert len(f"{name_a}-1023") <= 63


def test_an_attempt_is_a_config_map_a_headless_service_and_an_indexed_job():
    config_map, service, job = attempt_objects()
    assert [o["kind"] for o in (config_map, service, job)] == ["ConfigMap", "Service", "Job"]
    assert {o["metadata"]["name"] for o in (config_map, service, job)} == {"legal-7b-a2"}
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["ports"][0]["port"] == 29500
    assert service["spec"]["selector"] == {"cpt.mlops.dev/run": "legal-7b", "cpt.mlops.dev/attempt": "2"}
    assert job["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 2, 2, 0)
    assert pod_spec(job)["restartPolicy"] == "Never" and pod_spec(job)["subdomain"] == "legal-7b-a2"


def test_every_object_is_owned_by_the_cptrun():
    for obj in attempt_objects():
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "name": "legal-7b", "uid": "5f0c-uid",
            "controller": True, "blockOwnerDeletion": True}]


def test_torchrun_is_wired_to_the_index_zero_pod_and_the_completion_index():
    *_, job = attempt_objects()
    container = pod_spec(job)["containers"][0]
    assert container["command"] == ["python", "-m", "cpt_trainer.launch"]  # torchrun, keeping the refusal code
    args = container["args"]
    pairs = dict(zip(args, args[1:]))
    assert pairs["--nnodes"] == "2" and pairs["--nproc-per-node"] == "8"
    assert pairs["--rdzv-backend"] == "c10d"
    assert pairs["--rdzv-endpoint"] == "legal-7b-a2-0.legal-7b-a2:29500"
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert args[-4:] == ["-m", "cpt_trainer", "--config", f"/etc/cpt/{CONFIG_FILE}"]
    assert args.index("--node-rank=$(JOB_COMPLETION_INDEX)") < args.index("-m")


def test_a_stop_leaves_time_for_a_sharded_save_before_any_kill():
    *_, job = attempt_objects()
    pod = pod_spec(job)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == 600  # resources.stopGraceSeconds' default
    args = pod["containers"][0]["args"]
    shutdown = int(next(a for a in args if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert 30 <= shutdown < grace  # torchrun lets the trainers save, then exits before SIGKILL
    assert args.index(f"--shutdown-timeout={shutdown}") < args.index("-m")


def test_pods_land_on_the_pool_with_gpus_shared_memory_and_s3_credentials():
    *_, job = attempt_objects()
    pod = pod_spec(job)
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "90", "memory": "900Gi"}
    assert container["image"] == "registry.example/cpt-trainer:1.0"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["config"]["configMap"]["name"] == "legal-7b-a2"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm" and mounts["config"] == "/etc/cpt"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(SETTINGS.trainer_metrics_port)


def test_checkpoint_staging_lands_on_the_work_volume_the_scratch_disk_sizes():
    unsized = pod_spec(attempt_objects()[-1])
    container = unsized["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env[STAGING_DIR_ENV] == env["HOME"] == mounts["work"]  # S3 saves stage there, not in the image's /tmp
    assert {v["name"]: v for v in unsized["volumes"]}["work"]["emptyDir"] == {}
    assert "ephemeral-storage" not in container["resources"]["requests"]

    sized = pod_spec(attempt_objects(build_spec(scratch="200Gi"))[-1])
    resources = sized["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "200Gi"
    assert {v["name"]: v for v in sized["volumes"]}["work"]["emptyDir"] == {"sizeLimit": "200Gi"}


def test_pods_run_with_the_restricted_security_profile():
    *_, job = attempt_objects()
    pod = pod_spec(job)
    container = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("resources, gpu_limit, nproc", [
    ({"gpusPerNode": 0, "nprocPerNode": 2, "nodeSelector": {"pool": "cpu"}, "cpu": None, "memory": None}, None, "2"),
    ({"gpusPerNode": 4}, "4", "4"),
], ids=["a CPU run asks for no GPU and runs nprocPerNode workers", "four GPUs mean four workers"])
def test_processes_per_node_follow_the_gpus(resources, gpu_limit, nproc):
    *_, job = attempt_objects(build_spec(**resources))
    container = pod_spec(job)["containers"][0]
    assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == gpu_limit
    args = container["args"]
    assert args[args.index("--nproc-per-node") + 1] == nproc


def test_a_queued_job_is_created_suspended_with_the_kueue_labels():
    *_, job = attempt_objects(build_spec(queue="team-a", priorityClass="urgent"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"
    assert job["spec"]["suspend"] is True  # no pod before Kueue admits the whole gang
    *_, plain = attempt_objects(build_spec(priorityClass="urgent"))
    assert not {"kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"} & set(plain["metadata"]["labels"])
    assert "suspend" not in plain["spec"]


def test_the_config_map_holds_the_attempts_trainer_config():
    config_map, *_ = attempt_objects()
    config = json.loads(config_map["data"][CONFIG_FILE])
    assert config["run"] == "legal-7b" and config["namespace"] == "ml" and config["attempt"] == 2
    assert config["restoreFrom"] == "s3://ckpt/runs/legal-7b/attempt-001/step-00000100"
    assert config["restoreMode"] == "fullState"
    assert config["checkpointUri"] == "s3://ckpt/runs/legal-7b/attempt-002"
    assert config["overrides"] == {"lrScale": 0.5, "replayDelta": 0.1, "skips": []}
    assert config["metricsPort"] == SETTINGS.trainer_metrics_port
    assert config["spec"]["resources"]["nodes"] == 2


def test_a_first_attempt_starts_from_the_base():
    config_map, *_ = attempt_objects(number=1, restore=None)
    assert "restoreFrom" not in json.loads(config_map["data"][CONFIG_FILE])


def test_a_cluster_run_needs_an_object_store_for_checkpoints():
    doc_spec = build_spec()
    no_uri = doc_spec.model_copy(update={"checkpoint": doc_spec.checkpoint.model_copy(update={"uri": None})})
    with pytest.raises(SpecProblem, match="checkpoint.uri is required"):
        checkpoint_root(no_uri)


def test_builders_are_pure_same_inputs_same_objects():
    assert attempt_objects() == attempt_objects()
    assert RunRef(name="a", namespace="b", uid="c") == RunRef(name="a", namespace="b", uid="c")


def stop_policy(**policy: int):
    return CptRunSpec.model_validate({**spec_doc(), "stopPolicy": policy})


def test_torchrun_restarts_crashed_trainers_in_place_up_to_the_spec():
    *_, job = attempt_objects(stop_policy(maxInPlaceRestarts=3))
    args = pod_spec(job)["containers"][0]["args"]
    assert "--max-restarts=3" in args and args.index("--max-restarts=3") < args.index("-m")


def test_a_failed_pod_fails_the_job_unless_pods_may_be_replaced_by_index():
    *_, job = attempt_objects()
    assert job["spec"]["backoffLimit"] == 0 and "podFailurePolicy" not in job["spec"]
    *_, job = attempt_objects(stop_policy(maxPodReplacements=2))
    spec = job["spec"]
    assert "backoffLimit" not in spec  # a Job-wide limit would end it at the first failure
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"], spec["podReplacementPolicy"]) == (2, 0, "Failed")
    refuse, disrupted = spec["podFailurePolicy"]["rules"]
    assert refuse["action"] == "FailJob" and refuse["onExitCodes"]["values"] == [EXIT_REFUSED]
    assert disrupted == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
