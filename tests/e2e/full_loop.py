"""The full loop of a CptRun on the test cluster with the real trainer, shared by
test_operator_full_loop.py (its assertions), tests/faults (its fault-free twin) and
test_separate_evaluation.py (the kubelet).

Under kwok no container runs, so the test is the node's kubelet (`Kubelet`): for every pod of
the run it starts the pod's own command (`torchrun ... -m cpt_trainer --config ...`) on this
machine with the pod's env, its volumes as local directories (the ConfigMap's files, emptyDirs)
and the S3 Secret's variables; it registers the trainer's metrics endpoint with the real
Prometheus, stops the process group when the pod is deleted (SIGTERM, SIGKILL after the grace
period) and reports the exit code through the kwok stage annotations. Only what cannot exist off
the cluster is replaced: mount paths by local directories, the pod's DNS name in the rendezvous
endpoint by 127.0.0.1, and the fixed metrics port by a free one (each pod has a network
namespace of its own; processes here share one).

`drive` runs one CptRun to its end under that kubelet and reads back what it left: its status,
every checkpoint in the bucket verified byte for byte, the Jobs at the rollback. `fault_free_loop`
(tests/e2e/fixtures.py) is the forgetful run driven once per session: the full-loop test asserts
on it and the fault suite compares its faulted run with it, so the same run is not trained twice.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from cpt_api.events import CheckpointSaved, parse_event
from cpt_api.manifest import EVENTS, MANIFEST, Manifest
from tests.e2e.operator_harness import (OperatorProcess, events, free_port, install_crd, job_names,
                                        operator_env, status_of, trainer_config)
from tests.integration.harness import forgetting_files, pretrain_on_code

RUN = "forgetful"
GENERAL = "general.perplexity"
THRESHOLD = 0.3
TUNE = {"lrFactor": 0.1, "replayDelta": 0.3}
CONFIG_FILE = "trainer-config.json"
RUNNING = "cpt-test/running"
"""Set on a pod while its container runs here (tests/cluster/stages.yaml keeps it while deleted)."""
SELECTOR = f"cpt.mlops.dev/run={RUN}"
RUN_TIMEOUT_S = 480
T = TypeVar("T")


# -- the kubelet ------------------------------------------------------------------------------
@dataclass
class LocalPod:
    """One pod's trainer container, running on this machine."""

    name: str
    attempt: int
    proc: subprocess.Popen[bytes]
    run_dir: Path
    log: Path
    grace_s: float
    metrics: str | None = None
    kill_at: float | None = None
    deleted_while_running: bool = False
    reported: bool = False

    @property
    def serving(self) -> bool:
        """The trainer is up: rank 0 opened its event log (with its metrics endpoint)."""
        return (self.run_dir / EVENTS).exists()


def host_path(mounts: dict[str, Path], path: str) -> str:
    """Where a path inside the container lies on this machine (itself when on no volume)."""
    for mount in sorted(mounts, key=len, reverse=True):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + path[len(mount):]
    return path


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` references in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def field_value(pod: dict[str, Any], path: str) -> str:
    """A downward-API `fieldRef` (the Job controller gives JOB_COMPLETION_INDEX this way)."""
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if keyed:
        return str(pod["metadata"].get(keyed.group(1), {})[keyed.group(2)])
    head, _, attr = path.partition(".")
    return str(pod[head][attr])


def localised_config(text: str, mounts: dict[str, Path], metrics_port: int) -> str:
    """The pod's trainer config for this machine: its run directory on the work volume's local
    directory, and a free metrics port of the kubelet's choosing, since every attempt here shares
    one network namespace."""
    doc = json.loads(text)
    doc["runDir"] = host_path(mounts, doc["runDir"])
    doc["metricsPort"] = metrics_port
    return json.dumps(doc, indent=2)


class Kubelet:
    """Runs the containers of a run's pods here, as the kubelet of their (kwok) node would."""

    def __init__(self, kube: Any, prometheus: Any, namespace: str, selector: str, root: Path):
        self.kube, self.prometheus, self.namespace, self.selector = kube, prometheus, namespace, selector
        self.root = root
        self.pods: dict[str, LocalPod] = {}

    def sync(self) -> None:
        live = {p["metadata"]["uid"]: p for p in self.kube.pods(self.namespace, self.selector)}
        for uid, pod in live.items():
            if uid not in self.pods and pod["status"].get("phase") == "Running" \
                    and not pod["metadata"].get("deletionTimestamp"):
                self.pods[uid] = self._start(pod)
        for uid, local in self.pods.items():
            pod = live.get(uid)
            if local.proc.poll() is None:
                self._watch(local, pod)
            elif not local.reported:
                self._report(local, pod)

    def close(self) -> None:
        """Whatever still runs goes, workers a dead launcher left behind included."""
        for local in self.pods.values():
            try:
                os.killpg(local.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            local.proc.wait()
            if local.metrics:
                self.prometheus.remove_target(local.metrics)
            if not local.reported:
                self.kube.kubectl_result("annotate", "pod", local.name, "-n", self.namespace, f"{RUNNING}-")

    def attempt(self, number: int) -> LocalPod:
        """The pod of attempt `number` (0: the separate evaluations' pods have no attempt)."""
        return next(p for p in self.pods.values() if p.attempt == number)

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {p.name} (rc {p.proc.poll()}) ---\n{p.log.read_text(errors='replace')[-chars:]}"
                         for p in self.pods.values())

    def _start(self, pod: dict[str, Any]) -> LocalPod:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        root = self.root / meta["name"]
        mounts = {m["mountPath"]: root / "volumes" / m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        metrics_port = free_port()
        for m in container.get("volumeMounts", []):
            self._fill(volumes[m["name"]], mounts[m["mountPath"]], mounts, metrics_port)
        env = self._env(pod, container, mounts)
        argv = [host_path(mounts, expand(a, env)) for a in container["command"] + container.get("args", [])]
        if "--rdzv-endpoint" in argv:  # a separate evaluation's pod is one process, no rendezvous
            argv[argv.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{free_port()}"
        config = json.loads(Path(argv[argv.index("--config") + 1]).read_text())
        log = root / "trainer.log"
        # the pod stays Terminating until the process exits (kwok's pod-delete stage waits for this)
        self.kube.kubectl_result("annotate", "pod", meta["name"], "-n", self.namespace, f"{RUNNING}=true")
        attempt = int(meta["labels"].get("cpt.mlops.dev/attempt", "0"))
        metrics = None
        if any(port.get("name") == "metrics" for port in container.get("ports", [])):
            # Prometheus scrapes the pod before its container starts, as Kubernetes discovery finds
            # a pod once it has an address: discovered targets are applied at most every 5 s, and
            # an attempt stopped soon after its breach may expose its metrics for less than that.
            # The target labels are those a PodMonitor gives a pod's endpoint (honorLabels: false).
            metrics = f"127.0.0.1:{metrics_port}"
            self.prometheus.add_target(metrics, {"pod": meta["name"], "namespace": self.namespace})
            deadline = time.monotonic() + 30
            while not any(t["discoveredLabels"].get("__address__") == metrics for t in self.prometheus.targets()):
                assert time.monotonic() < deadline, f"Prometheus did not take up the target {metrics}"
                time.sleep(0.2)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return LocalPod(name=meta["name"], attempt=attempt, proc=proc,
                        run_dir=Path(config["runDir"]), log=log, metrics=metrics,
                        grace_s=float(spec.get("terminationGracePeriodSeconds", 30)))

    def _fill(self, volume: dict[str, Any], directory: Path, mounts: dict[str, Path], metrics_port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            cm = self.kube.kubectl_json("get", "configmap", volume["configMap"]["name"], "-n", self.namespace)
            for key, text in cm["data"].items():
                local = localised_config(text, mounts, metrics_port) if key == CONFIG_FILE else text
                (directory / key).write_text(local)

    def _env(self, pod: dict[str, Any], container: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        # the image's PATH (this venv); one BLAS thread: two cores are shared with the control plane
        env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
        if "PYTHONPATH" in os.environ:  # the image's code is this checkout's, not whatever the venv points at
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for source in container.get("envFrom", []):
            secret = self.kube.kubectl_json("get", "secret", source["secretRef"]["name"], "-n", self.namespace)
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = host_path(mounts, expand(var["value"], env))
            elif "fieldRef" in var.get("valueFrom", {}):
                env[var["name"]] = field_value(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
        return env

    def _watch(self, local: LocalPod, pod: dict[str, Any] | None) -> None:
        if pod is not None and not pod["metadata"].get("deletionTimestamp"):
            return
        if local.kill_at is None:
            grace = (pod or {}).get("metadata", {}).get("deletionGracePeriodSeconds", local.grace_s)
            local.kill_at, local.deleted_while_running = time.monotonic() + float(grace), True
            os.killpg(local.proc.pid, signal.SIGTERM)
        elif time.monotonic() > local.kill_at:
            os.killpg(local.proc.pid, signal.SIGKILL)

    def _report(self, local: LocalPod, pod: dict[str, Any] | None) -> None:
        if local.metrics:
            self.prometheus.remove_target(local.metrics)
        if pod is not None and not pod["metadata"].get("deletionTimestamp"):
            outcome = "cpt-test/complete=true" if local.proc.returncode == 0 else "cpt-test/fail=true"
            self.kube.kubectl("annotate", "pod", local.name, "-n", self.namespace, outcome, f"{RUNNING}-",
                              "--overwrite")
        elif pod is not None:  # deleted: now kwok removes it
            self.kube.kubectl_result("annotate", "pod", local.name, "-n", self.namespace, f"{RUNNING}-")
        local.reported = True


# -- helpers ---------------------------------------------------------------------------------
def forgetful_run(bucket: str, tmp: Path, tiny_model_dir: Path, corpora: dict[str, Path]) -> dict[str, Any]:
    """LR 3e-2 after a 10-step warmup with 2 % replay: the checkpoint at step 4 is still within
    the gate (Python perplexity at most +30 %), from step 6 to the end of the budget evaluations are
    far above it; at a tenth of the LR with 32 % replay, attempt 2 stays within it. The budget
    leaves attempt 1 training for many steps after its breach: the operator has to stop it. It
    stopped attempt 1 at step 12 to 14 in the runs measured, faulted ones included (the breach
    is read from the trainer's evaluation records by the next pass); 120 steps leave over 100
    steps of margin, ~10 s on an idle machine at ~0.1 s a step. Attempt 2 trains the rest of the
    budget with a checkpoint every 4 steps, so the budget is most of this test's time."""
    base = pretrain_on_code(tiny_model_dir, tmp / "base")
    files = forgetting_files(tmp, sorted(Path(corpora["domain"]).glob("*.txt")))
    code_train, code_eval, legal_eval = files["code_train"], files["code_eval"], files["legal_eval"]
    spec = {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.98},
            {"name": "code", "role": "replay", "uri": str(code_train), "format": "jsonl", "weight": 0.02},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-2, "weightDecay": 0.0},
        "schedule": {"warmupSteps": 10, "decay": "constant"},
        "budget": {"steps": 120},
        "training": {"microBatchSize": 4, "gradAccumulation": 4},
        # skipped steps and restores would make the trajectories below depend on the anomaly
        # detector, which is not this test's subject: its limits are out of reach
        "gradient": {"anomaly": {"k": 1000.0, "lossSpikeFactor": 1000.0}},
        "checkpoint": {"uri": f"s3://{bucket}/runs/{RUN}", "every": 4, "keep": 100},
        "evaluation": {"every": 2, "suites": [
            {"name": "legal", "kind": "domain", "uri": str(legal_eval), "maxSamples": 4},
            {"name": "general", "kind": "general", "uri": str(code_eval), "maxSamples": 8}]},
        "gates": [{"name": "forgetting", "suite": "general", "baseline": "base", "threshold": THRESHOLD,
                   "relative": True, "action": "rollback", "rollbackTo": "lastGood", "tune": TUNE}],
        # one rollback: the tuned attempt breaching again would fail the run
        "stopPolicy": {"maxRollbacks": 1},
        "resources": {"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "h100"},
                      "s3SecretRef": "s3-credentials"},
    }
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": RUN}, "spec": spec}


def s3_secret(s3_server: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
            "stringData": dict(s3_server.env)}


def until(kubelet: Kubelet, check: Callable[[], T | None], what: str, timeout: float) -> T:
    """Poll `check` while the kubelet does its work; on timeout say what the trainers said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kubelet.sync()
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{kubelet.tails()}")


def trainer_events(local: LocalPod) -> list[Any]:
    path = local.run_dir / EVENTS
    return [parse_event(line) for line in path.read_text().splitlines() if line.strip()]


# -- one run, driven to its end ---------------------------------------------------------------
@dataclass
class Outcome:
    """What a run left behind."""
    status: dict[str, Any]
    seconds: float
    max_attempts_with_pods: int
    verified: dict[str, Manifest]
    broken: list[str]
    incomplete: list[str]
    saved: set[str]
    jobs_at_rollback: list[str] | None = None
    """The run's Jobs when attempt 2's first showed (None: it never did)."""


class Watch(Protocol):
    """Called on each poll of `drive` (the fault injector): whether the run has ended."""

    def ended(self, status: dict[str, Any], kubelet: Kubelet, ended: bool) -> bool: ...

    def close(self) -> None: ...


def sha256_of_tree(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def verify_bucket(client: Any, bucket: str) -> tuple[dict[str, Manifest], list[str], list[str]]:
    """Every checkpoint under the run's root, read back byte by byte: (verified manifests by
    name, checkpoints whose files do not match their manifest, dirs without a manifest)."""
    prefix = f"runs/{RUN}/"
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    dirs = {"/".join(k[len(prefix):].split("/")[:2]) for k in objects if k[len(prefix):].count("/") >= 2}
    verified, broken, incomplete = {}, [], []
    for name in sorted(d for d in dirs if "/step-" in f"/{d}"):
        key = f"{prefix}{name}/{MANIFEST}"
        if key not in objects:
            incomplete.append(name)
            continue
        manifest = Manifest.model_validate_json(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        bad = []
        for rel, entry in manifest.files.items():
            body = client.get_object(Bucket=bucket, Key=f"{prefix}{name}/{rel}")["Body"].read()
            if len(body) != entry.size or hashlib.sha256(body).hexdigest() != entry.sha256:
                bad.append(rel)
        (broken.append(f"{name}: {bad}") if bad else verified.__setitem__(name, manifest))
    return verified, broken, incomplete


def saved_by(pod: LocalPod) -> list[str]:
    events = pod.run_dir / EVENTS
    return ["/".join(e.uri.split("/")[-2:]) for e in trainer_events(pod)
            if isinstance(e, CheckpointSaved)] if events.exists() else []


def attempts_with_pods(kube: Any, namespace: str, kubelet: Kubelet) -> set[int]:
    """Attempts holding pods now: not yet terminated on the API server, or still running here."""
    on_server = {int(p["metadata"]["labels"]["cpt.mlops.dev/attempt"]) for p in kube.pods(namespace, SELECTOR)
                 if p["status"].get("phase") not in ("Succeeded", "Failed")}
    return on_server | {p.attempt for p in kubelet.pods.values() if p.proc.poll() is None}


def drive(kube: Any, prometheus: Any, s3_server: Any, namespace: str, bucket: str, run: dict[str, Any],
          node: Path, watch: Callable[[Kubelet], Watch] | None = None) -> tuple[Outcome, Kubelet]:
    """Apply `run` and be its kubelet until it ends and every trainer has exited."""
    kube.apply(run, namespace=namespace)
    kubelet = Kubelet(kube, prometheus, namespace, SELECTOR, node)
    watcher = watch(kubelet) if watch else None
    start, most, at_rollback = time.monotonic(), 0, None
    try:
        while True:
            assert time.monotonic() - start < RUN_TIMEOUT_S, f"the run did not end\n{kubelet.tails()}"
            kubelet.sync()
            status = status_of(kube, namespace, RUN)
            most = max(most, len(attempts_with_pods(kube, namespace, kubelet)))
            if at_rollback is None and f"{RUN}-a2" in (jobs := job_names(kube, namespace, RUN)):
                at_rollback = jobs
            ended = status.get("phase") in ("Succeeded", "Failed", "Stopped") and all(
                p.reported for p in kubelet.pods.values())
            if watcher is not None:
                ended = watcher.ended(status, kubelet, ended)
            if ended:
                break
            time.sleep(0.5)
    finally:
        kubelet.close()
        if watcher is not None:
            watcher.close()
    seconds = time.monotonic() - start
    verified, broken, incomplete = verify_bucket(s3_server.client(), bucket)
    saved = {name for p in kubelet.pods.values() for name in saved_by(p)}
    return Outcome(status=status_of(kube, namespace, RUN), seconds=seconds, max_attempts_with_pods=most,
                   verified=verified, broken=broken, incomplete=incomplete, saved=saved,
                   jobs_at_rollback=at_rollback), kubelet


# -- the fault-free run, once a session -------------------------------------------------------
@dataclass
class FaultFree:
    """The forgetful run driven to its end by an operator of its own, and what only the cluster
    held (its namespace is deleted once read, so later operators never see a finished run)."""
    run: dict[str, Any]
    namespace: str
    bucket: str
    base_digest: str
    """sha256 of the base model's files before the run: a run must never write them."""
    outcome: Outcome
    kubelet: Kubelet
    second_config: dict[str, Any]
    """Attempt 2's trainer config, as its ConfigMap held it."""
    event_reasons: set[str]
    """Reasons of the CptRun's Kubernetes Events."""


def run_fault_free(kube: Any, prometheus: Any, s3_server: Any, tmp: Path, tiny_model_dir: Path,
                   corpora: dict[str, Path]) -> FaultFree:
    install_crd(kube)
    bucket = s3_server.create_bucket()
    run = forgetful_run(bucket, tmp, tiny_model_dir, corpora)
    base_digest = sha256_of_tree(Path(run["spec"]["baseModel"]["uri"]))
    namespace = kube.create_namespace(f"full-loop-{uuid.uuid4().hex[:8]}")
    kube.apply(s3_secret(s3_server), namespace=namespace)
    # an operator that watches only this namespace: no other run is its business
    op = OperatorProcess({**operator_env(kube, prometheus, s3_server), "CPT_NAMESPACES": namespace},
                         tmp / "operator.log").start()
    try:
        outcome, kubelet = drive(kube, prometheus, s3_server, namespace, bucket, run, tmp / "node")
    finally:
        op.stop()
        print(f"--- fault-free operator log (tail) ---\n{op.tail(80)}")
    print(kubelet.tails())
    second = trainer_config(kube, namespace, f"{RUN}-a2") if outcome.jobs_at_rollback else {}
    reasons = {e["reason"] for e in events(kube, namespace, RUN)}
    kube.kubectl_result("delete", "namespace", namespace, "--wait=false")
    return FaultFree(run, namespace, bucket, base_digest, outcome, kubelet, second, reasons)
