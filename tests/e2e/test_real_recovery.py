"""A CptRun as a user runs it, every pod in a real container, and its recovery from failures,
timed. `helm install` puts the operator on the real node as a pod (its image, its
ServiceAccount, the API server through the in-cluster config); `kubectl apply` of a two-node run
makes it create the ConfigMap, headless Service and Indexed Job, and the two trainer pods (the
trainer image) find each other through the Service's DNS names, rendezvous with torchrun's c10d,
train the tiny model on data in S3 and write their checkpoints there. Pod Security "restricted"
is enforced in both namespaces.

Midway it recovers three ways: a crashed trainer process (twice) restarted in place by torchrun,
a deleted pod replaced by index while the other pod's trainers restart in place, and a crash past
those limits answered by a new attempt (a new Job) restored from the newest checkpoint in S3,
which trains to the end of the budget. Each recovery is timed from the kill or the deletion to the
next training step and split into its parts; the figures are printed and written to
`recovery.json` in the test's folder (bench/RESULTS.md quotes them). The end is checked as a user
would: the chosen checkpoint's lineage, the trainers' own logs, `kubectl get cptruns`.

What is not real here (tests/cluster/README.md): the node is one machine's kubelet, so both
"nodes" of the run are pods on the same node; CoreDNS runs as a host process; the `kubernetes`
Service is one DNAT rule instead of kube-proxy; Prometheus finds pods through the harness's
PodDiscovery (Debian's Prometheus has no Kubernetes discovery).
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_api.events import Finished, Progress, Started, parse_event
from cpt_api.manifest import MANIFEST
from cpt_operator.policy.start import instant
from tests.cluster.cluster import Prometheus, S3Server
from tests.e2e.operator_harness import condition, status_of, trainer_config
from tests.e2e.real_pods import RUN, container_id, manifests, new_namespace, two_node_run, upload_inputs
from tests.e2e.test_helm_install import helm
from tests.helm import chartlib

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.helm, pytest.mark.s3,
              pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(900)]

def events_of(kube: Any, ns: str, pod: str) -> list[Any]:
    """Rank 0's events, from its container's log (the trainer logs each one)."""
    text = kube.kubectl_result("logs", "-n", ns, pod).stdout
    return [parse_event(m.group(1)) for m in re.finditer(r" event (\{.*\})$", text, re.M)]


def worker_pid(real_node: Any, pod: dict[str, Any]) -> int:
    """The host PID of the pod's trainer process: the child of its torchrun."""
    cid = container_id(pod)
    assert cid, pod["status"]
    listing = real_node.ctr("tasks", "ps", cid).stdout.split()
    pids = [int(p) for p in listing if p.isdigit()]

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    agents = {p for p in pids if b"cpt_trainer.launch" in cmdline(p)}
    workers = [p for p in pids if p not in agents and b"cpt_trainer" in cmdline(p)
               and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) in agents]
    assert len(workers) == 1, (listing, [cmdline(p) for p in pids])
    return workers[0]


def recovery_in_pod(evs: list[Any], killed_at: float) -> dict[str, float] | None:
    """Kill -> the next step, from rank 0's events in its pod: torchrun noticing and re-forming
    the ranks (to the new trainer process), the trainer's start (imports, process group, the
    restore from S3), and its first step; with the steps replayed since the last checkpoint."""
    after = [i for i, e in enumerate(evs) if isinstance(e, Started) and e.time > killed_at]
    if not after:
        return None
    i = after[0]
    started = evs[i]
    step = next((e for e in evs[i:] if isinstance(e, Progress)), None)
    before = [e for e in evs[:i] if getattr(e, "times", None) is not None]  # the last trainer's reports
    if step is None or not before or started.times is None:
        return None
    last = before[-1].times
    # the restarted trainer counts (its start - the last report) as the failure's time
    process = last.reported + (started.times.failures - last.failures)
    done = max((e.step for e in evs[:i] if isinstance(e, Progress) and e.time <= killed_at), default=0)
    return {"kill_to_step_s": step.time - killed_at, "detect_and_reform_s": process - killed_at,
            "trainer_start_and_restore_s": started.time - process, "first_step_s": step.time - started.time,
            "steps_replayed": max(0, done - started.step)}


def test_a_crash_recovers_in_place_then_by_index_then_by_a_new_attempt(
        kube_cluster: Any, real_node: Any, helm_bin: Path, operator_image: str, trainer_image: str,
        host_s3: S3Server, host_prometheus: Prometheus, tmp_path: Path, tiny_model_dir: Path,
        corpora: dict[str, Path]) -> None:
    kube = kube_cluster
    system, ns = new_namespace(kube, "cpt-system"), new_namespace(kube, "team")
    bucket = host_s3.create_bucket()
    inputs = upload_inputs(host_s3, bucket, tmp_path, tiny_model_dir, corpora)
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                "stringData": dict(host_s3.env)}, namespace=ns)
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
    install = helm(helm_bin, kube, "install", "cpt", str(chartlib.CHART), "-n", system, "-f", str(values_file),
                   "--wait", "--timeout", "240s", timeout=300)
    assert install.returncode == 0, install.stderr + kube.kubectl_result(
        "get", "pods", "-n", system, "-o", "wide").stdout
    (op_pod,) = kube.pods(system, "app.kubernetes.io/component=operator")
    assert op_pod["spec"]["nodeName"] == real_node.name
    run = two_node_run(inputs, bucket, placement)
    run["spec"]["budget"] = {"steps": 120}
    run["spec"]["stopPolicy"] = {"maxInPlaceRestarts": 3, "maxPodReplacements": 1, "maxAttemptRestarts": 1}
    figures: dict[str, Any] = {}
    try:
        kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(run))

        def pod(attempt: int, index: int) -> dict[str, Any] | None:
            live = [p for p in kube.pods(ns, f"cpt.mlops.dev/run={RUN},cpt.mlops.dev/attempt={attempt}")
                    if p["metadata"]["name"].startswith(f"{RUN}-a{attempt}-{index}-")
                    and container_id(p) is not None]
            return live[0] if live else None

        def saved_beyond(step: int) -> list[str] | None:
            found = [n for n in manifests(host_s3, bucket, 1) if int(n.split("-")[1]) > step]
            return found or None

        # 1. a trainer process crashes, twice: torchrun restarts it in place, both pods keep running
        pod0 = kube.wait_for(lambda: pod(1, 0), "pod 0", timeout=420)
        name0 = pod0["metadata"]["name"]
        both = (pod0, kube.wait_for(lambda: pod(1, 1), "pod 1", timeout=300))
        assert all(p["spec"].get("nodeName") == real_node.name for p in both)
        for crash in (1, 2):
            newest = int((manifests(host_s3, bucket, 1) or ["step-0"])[-1].split("-")[1])
            kube.wait_for(lambda n=newest: saved_beyond(n), "a checkpoint to restart from", timeout=420, interval=0.5)
            os.kill(worker_pid(real_node, kube.wait_for(lambda: pod(1, 1), "pod 1", timeout=60)), signal.SIGKILL)
            killed = time.time()
            figures[f"in_place_{crash}"] = kube.wait_for(
                lambda k=killed: recovery_in_pod(events_of(kube, ns, name0), k),
                f"the next step after in-place restart {crash}", timeout=300, interval=1)

        # 2. pod 1 is deleted: every rank saves, the Job replaces pod 1 by index, pod 0's trainer
        # restarts in place (EXIT_PEER_STOPPED) and both go on from that checkpoint
        newest = int(manifests(host_s3, bucket, 1)[-1].split("-")[1])
        kube.wait_for(lambda: saved_beyond(newest), "a checkpoint after the restarts", timeout=300, interval=0.5)
        victim = kube.wait_for(lambda: pod(1, 1), "pod 1", timeout=60)
        kube.kubectl("delete", "pod", "-n", ns, victim["metadata"]["name"], "--wait=false")
        killed = time.time()
        figures["pod_deleted"] = kube.wait_for(
            lambda: recovery_in_pod(events_of(kube, ns, name0), killed),
            "the next step after pod 1 was replaced", timeout=300, interval=1)
        replaced = kube.wait_for(lambda: pod(1, 1), "the replacement pod 1", timeout=60)
        assert replaced["metadata"]["uid"] != victim["metadata"]["uid"]
        assert (pod(1, 0) or {}).get("metadata", {}).get("uid") == pod0["metadata"]["uid"]
        assert [j["metadata"]["name"] for j in kube.kubectl_json("get", "jobs", "-n", ns)["items"]] == [f"{RUN}-a1"]

        # 3. pod 1's container dies: past its replacement the Job fails, and a new attempt takes over
        newest = int(manifests(host_s3, bucket, 1)[-1].split("-")[1])
        kube.wait_for(lambda: saved_beyond(newest), "a checkpoint after the replacement", timeout=300, interval=0.5)
        victim = kube.wait_for(lambda: pod(1, 1), "pod 1", timeout=60)
        real_node.ctr("tasks", "kill", "-s", "SIGKILL", container_id(victim))
        killed = time.time()
        killed_after = manifests(host_s3, bucket, 1)
        a2 = kube.wait_for(lambda: pod(2, 0), "attempt 2's pod 0", timeout=300, interval=1)
        name2 = a2["metadata"]["name"]

        def first_step() -> list[Any] | None:
            evs = events_of(kube, ns, name2)
            return evs if any(isinstance(e, Progress) for e in evs) else None

        evs = kube.wait_for(first_step, "attempt 2's first step", timeout=300, interval=1)
        job = kube.kubectl_json("get", "job", f"{RUN}-a2", "-n", ns)
        created = instant(job["metadata"]["creationTimestamp"]).timestamp()
        running = instant(next(cs["state"]["running"]["startedAt"] for cs in a2["status"]["containerStatuses"]
                               if cs["name"] == "trainer")).timestamp()
        started = next(e for e in evs if isinstance(e, Started))
        step = next(e for e in evs if isinstance(e, Progress))
        assert started.times is not None
        figures["new_attempt"] = {
            "kill_to_step_s": step.time - killed, "detect_and_new_job_s": created - killed,
            "pods_start_s": running - created, "torchrun_to_trainer_s": started.times.began - running,
            "trainer_start_and_restore_s": started.time - started.times.began,
            "first_step_s": step.time - started.time}

        def ended() -> dict[str, Any] | None:
            status = status_of(kube, ns, RUN)
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = kube.wait_for(ended, "the run to end", timeout=600, interval=2)
        logs = {p["metadata"]["name"]: kube.kubectl("logs", "-n", ns, p["metadata"]["name"])
                for p in kube.pods(ns, f"cpt.mlops.dev/run={RUN},cpt.mlops.dev/attempt=2")}
        assert status["phase"] == "Succeeded", (status, {k: v[-2000:] for k, v in logs.items()},
                                                kube.kubectl("logs", "-n", system, op_pod["metadata"]["name"]))
    finally:
        op_logs = kube.kubectl_result("logs", "-n", system, "-l", "app.kubernetes.io/component=operator",
                                      "--tail", "80").stdout
        print(f"--- operator pod log (tail) ---\n{op_logs}")
        print(f"--- recovery ---\n{json.dumps(figures, indent=1)}")
        (tmp_path / "recovery.json").write_text(json.dumps(figures, indent=1))
        helm(helm_bin, kube, "uninstall", "cpt", "-n", system, "--wait", "--timeout", "60s")

    assert (status["attempt"], status["restarts"]) == (2, 1), status
    assert status["inPlaceRestarts"] == 3, status  # two crashes, then pod 1's replacement (pod 0 restarted its)
    # the goodput account covers the run's wall time, the losses of each failure among it
    goodput = status["goodput"]
    seconds, wall = goodput["seconds"], goodput["until"] - goodput["since"]
    assert abs(sum(seconds.values()) - wall) <= 0.03 * wall + 2, (seconds, wall)
    for cause in ("productive", "starting", "restoring", "failures", "lostSteps", "checkpointing"):
        assert seconds[cause] > 0, (cause, seconds)
    assert 0 < goodput["share"] < 1
    for kind in ("in_place_1", "in_place_2", "pod_deleted"):
        assert figures[kind]["steps_replayed"] >= 0 and figures[kind]["kill_to_step_s"] > 0, figures
    assert figures["pod_deleted"]["steps_replayed"] == 0  # every rank saved before pod 1 went

    # attempt 2 resumed from the newest checkpoint attempt 1 had written when its pod died
    config = trainer_config(kube, ns, f"{RUN}-a2")
    resumed_from = config["restoreFrom"].removeprefix(f"s3://{bucket}/runs/{RUN}/")
    assert resumed_from in [f"attempt-001/{n}" for n in manifests(host_s3, bucket, 1)]
    assert resumed_from.split("/")[1] >= killed_after[-1], (resumed_from, killed_after)
    assert config["restoreMode"] == "fullState"
    # kubectl logs of attempt 2's pods is the trainers' own output (rank 0 logs its steps; the
    # other ranks log warnings only)
    assert len(logs) == 2, sorted(logs)
    rank0 = next(text for name, text in logs.items() if name.startswith(f"{RUN}-a2-0-"))
    assert "rank0 INFO" in rank0 and "step" in rank0, rank0[-2000:]
    ends = [parse_event(m.group(1)) for text in logs.values() for m in re.finditer(r" event (\{.*\})$", text, re.M)]
    assert any(isinstance(e, Finished) and e.reason == "budget" and e.step == 120 for e in ends), logs
    # the checkpoints and their manifests are in S3; the chosen one is among them, and its lineage
    # names the code that wrote it and the evaluation it was measured on
    assert manifests(host_s3, bucket, 2)[-1] == "step-00000120"
    attempt_dir, step = status["bestCheckpoint"].split("/")  # attempt-NNN/step-NNNNNNNN
    assert step in manifests(host_s3, bucket, int(attempt_dir.removeprefix("attempt-")))
    chosen = json.loads(host_s3.client().get_object(
        Bucket=bucket, Key=f"runs/{RUN}/{status['bestCheckpoint']}/{MANIFEST}")["Body"].read())
    assert chosen["lineage"]["codeVersion"].endswith(f" in {trainer_image}"), chosen["lineage"]
    assert sorted(chosen["lineage"]["evalDigests"]) == ["general", "legal"]
    assert condition(status, "Succeeded")["status"] == "True"
    printed = kube.kubectl("get", "cptruns", "-n", ns)
    assert RUN in printed and "Succeeded" in printed
