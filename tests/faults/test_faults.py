"""The full loop of tests/e2e/test_operator_full_loop.py under faults, against its fault-free twin.

The same tiny CptRun (a gate breach, a rollback to the last good checkpoint, a tuned attempt that
succeeds) runs twice on the real control plane, Prometheus and S3 with the real trainer: once
untouched, once with toxiproxy between the operator and the API server and between the trainers
(and the operator) and S3, a concurrent writer patching the run and its Job, etcd compactions,
and SIGKILLs of the operator (mid-rollback included) and of trainers, all on a schedule drawn from
a seed (`CPT_FAULTS_SEED`, printed with the schedule). After both, the invariants of
docs ARCHITECTURE are checked on the faulted run and its end compared with the fault-free one.

Run alone: `python -m pytest tests/faults -m faults -s` (the figures go to stdout and to
`bench/results/faults.json`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cpt_api.events import CheckpointSaved, Evaluated
from cpt_api.manifest import MANIFEST, Manifest
from tests.cluster.cluster import Toxiproxy
from tests.e2e.operator_harness import OperatorProcess, install_crd, operator_env, status_of
from tests.e2e.test_operator_full_loop import GENERAL, RUN, THRESHOLD, Kubelet, forgetful_run, s3_secret, trainer_events
from tests.faults.chaos import Injector, Writer, schedule, sigkill_group

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3,
              pytest.mark.slow, pytest.mark.timeout(1200)]

SEED = int(os.environ.get("CPT_FAULTS_SEED", "14"))
RUN_TIMEOUT_S = 480
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.json"
SELECTOR = f"cpt.mlops.dev/run={RUN}"


# -- what a run left behind -------------------------------------------------------------------
@dataclass
class Outcome:
    status: dict[str, Any]
    seconds: float
    max_attempts_with_pods: int
    verified: dict[str, Manifest]
    broken: list[str]
    incomplete: list[str]
    saved: set[str]
    restarts_of_operator: int = 0
    writer: dict[str, int] = field(default_factory=dict)


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


def saved_by(pod: Any) -> list[str]:
    events = pod.run_dir / "events.jsonl"
    return ["/".join(e.uri.split("/")[-2:]) for e in trainer_events(pod)
            if isinstance(e, CheckpointSaved)] if events.exists() else []


def milestones(status: dict[str, Any], kubelet: Kubelet) -> set[str]:
    """What the run has reached, from the trainers' own records (the status lags a pass behind)."""
    reached = {"applied"}
    pods = list(kubelet.pods.values())
    training = {p.attempt for p in pods if p.serving and p.proc.poll() is None}
    saved = {p.attempt for p in pods if saved_by(p)}
    if 1 in training:
        reached.add("a1-training")
    if 1 in saved:
        reached.add("a1-checkpointed")
    if status.get("phase") == "RollingBack" or status.get("history"):
        reached.add("rolling-back")
    if any(p.attempt >= 2 for p in pods):
        reached.add("tuned-started")
    if any(a >= 2 for a in training):
        reached.add("tuned-training")
    if any(a >= 2 for a in saved):
        reached.add("tuned-checkpointed")
    if any(p.attempt >= 3 for p in pods):
        reached.add("restarted")
    if status.get("phase") == "Succeeded":
        reached.add("succeeded")
    return reached


def attempts_with_pods(kube: Any, namespace: str, kubelet: Kubelet) -> set[int]:
    """Attempts holding pods now: not yet terminated on the API server, or still running here."""
    on_server = {int(p["metadata"]["labels"]["cpt.mlops.dev/attempt"]) for p in kube.pods(namespace, SELECTOR)
                 if p["status"].get("phase") not in ("Succeeded", "Failed")}
    return on_server | {p.attempt for p in kubelet.pods.values() if p.proc.poll() is None}


# -- the operator, killable -------------------------------------------------------------------
class Killable:
    """An operator that a fault SIGKILLs; a new one starts at once in the background (the
    Deployment's restart), while the kubelet goes on."""

    def __init__(self, op: OperatorProcess):
        self.op, self.kills = op, 0
        self._restart: threading.Thread | None = None

    def kill(self) -> None:
        self.wait()
        if self.op.proc is not None:
            sigkill_group(self.op.proc.pid)
            self.op.proc.wait()
        self.op.proc = None
        self.kills += 1
        self._restart = threading.Thread(target=self.op.start, daemon=True)
        self._restart.start()

    def wait(self) -> None:
        if self._restart is not None:
            self._restart.join(90)
            self._restart = None


def kill_trainer(kubelet: Kubelet, first: bool) -> bool:
    live = [p for p in kubelet.pods.values() if p.proc.poll() is None]
    newest = max((p.attempt for p in live), default=0)
    chosen = [p for p in live if p.attempt == (1 if first else newest)]
    for pod in chosen:
        sigkill_group(pod.proc.pid)
    return bool(chosen)


# -- one run ----------------------------------------------------------------------------------
def drive(kube: Any, prometheus: Any, s3_server: Any, namespace: str, bucket: str, run: dict[str, Any],
          node: Path, chaos: Callable[[Kubelet], Injector] | None = None) -> tuple[Outcome, Kubelet]:
    kube.apply(run, namespace=namespace)
    kubelet = Kubelet(kube, prometheus, namespace, SELECTOR, node)
    injector = chaos(kubelet) if chaos else None
    start, most = time.monotonic(), 0
    try:
        while True:
            assert time.monotonic() - start < RUN_TIMEOUT_S, f"the run did not end\n{kubelet.tails()}"
            kubelet.sync()
            status = status_of(kube, namespace, RUN)
            most = max(most, len(attempts_with_pods(kube, namespace, kubelet)))
            ended = status.get("phase") in ("Succeeded", "Failed", "Stopped") and all(
                p.reported for p in kubelet.pods.values())
            if injector is not None:
                injector.tick(milestones(status, kubelet))
                if ended and len(injector.fired) < len(injector.faults):
                    ended = time.monotonic() - injector.reached.get("succeeded", start) > 15
            if ended:
                break
            time.sleep(0.5)
    finally:
        kubelet.close()
        if injector is not None:
            injector.clear()
    seconds = time.monotonic() - start
    verified, broken, incomplete = verify_bucket(s3_server.client(), bucket)
    saved = {name for p in kubelet.pods.values() for name in saved_by(p)}
    return Outcome(status=status_of(kube, namespace, RUN), seconds=seconds, max_attempts_with_pods=most,
                   verified=verified, broken=broken, incomplete=incomplete, saved=saved), kubelet


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toxiproxy(kube_cluster: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    proxy = Toxiproxy(tmp_path_factory.mktemp("toxiproxy"), seed=SEED).start()
    try:
        proxy.proxy("api", kube_cluster.server.removeprefix("https://"))
        proxy.proxy("s3", s3_server.endpoint.removeprefix("http://"))
        yield proxy
    finally:
        proxy.stop()


def proxied_env(kube: Any, prometheus: Any, s3_server: Any, proxy: Toxiproxy, tmp: Path) -> dict[str, str]:
    """The operator's environment with the API server and S3 behind the proxy."""
    listen = {name: p["listen"] for name, p in proxy.proxies().items()}
    config = json.loads(kube.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://{listen['api']}"
    kubeconfig = tmp / "kubeconfig-proxied"
    kubeconfig.write_text(json.dumps(config))
    s3 = f"http://{listen['s3']}"
    return {**operator_env(kube, prometheus, s3_server), "KUBECONFIG": str(kubeconfig),
            "AWS_ENDPOINT_URL": s3, "AWS_ENDPOINT_URL_S3": s3}


# -- the test ---------------------------------------------------------------------------------
def test_a_breach_and_rollback_under_faults_ends_as_the_fault_free_run(
        kube_cluster: Any, prometheus: Any, s3_server: Any, toxiproxy: Toxiproxy, tmp_path: Path,
        tiny_model_dir: Path, corpora: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    suite_start = time.monotonic()
    kube = kube_cluster
    install_crd(kube)
    faults = schedule(SEED)
    print(f"\n[faults] seed {SEED}; schedule:\n" + "\n".join(f"  {f}" for f in faults))
    clean_bucket, faulty_bucket = s3_server.create_bucket(), s3_server.create_bucket()
    clean_run = forgetful_run(clean_bucket, tmp_path / "clean", tiny_model_dir, corpora)
    base = Path(clean_run["spec"]["baseModel"]["uri"])
    base_digest = sha256_of_tree(base)
    faulty_run = json.loads(json.dumps(clean_run).replace(f"s3://{clean_bucket}/", f"s3://{faulty_bucket}/"))

    # the fault-free run
    ns = kube.create_namespace(f"faults-clean-{SEED}")
    kube.apply(s3_secret(s3_server), namespace=ns)
    # Each operator watches only its own run's namespace: the faulted run's operators must not
    # find the finished fault-free run, nor the other way round.
    op = OperatorProcess({**operator_env(kube, prometheus, s3_server), "CPT_NAMESPACES": ns},
                         tmp_path / "operator-clean.log").start()
    try:
        clean, clean_kubelet = drive(kube, prometheus, s3_server, ns, clean_bucket, clean_run, tmp_path / "node-clean")
    finally:
        op.stop()
    print(f"[faults] fault-free run: {clean.status['phase']} in {clean.seconds:.0f} s, "
          f"chosen {clean.status.get('bestCheckpoint')}")

    # the faulted run: the trainers reach S3 through the proxy too (the Secret names it)
    ns = kube.create_namespace(f"faults-chaos-{SEED}")
    env = {**proxied_env(kube, prometheus, s3_server, toxiproxy, tmp_path), "CPT_NAMESPACES": ns}
    secret = s3_secret(s3_server)
    secret["stringData"].update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")})
    kube.apply(secret, namespace=ns)
    killable = Killable(OperatorProcess(env, tmp_path / "operator-chaos.log").start())
    writer = Writer(kube, ns, RUN)
    writer.start()
    injectors: list[Injector] = []

    def chaos(kubelet: Kubelet) -> Injector:
        injectors.append(Injector(faults, toxiproxy, kube.etcd_url, killable.kill,
                                  lambda first: kill_trainer(kubelet, first),
                                  lambda: str(status_of(kube, ns, RUN).get("phase"))))
        return injectors[0]

    try:
        faulty, kubelet = drive(kube, prometheus, s3_server, ns, faulty_bucket, faulty_run,
                                tmp_path / "node-chaos", chaos)
        writer.stop()
        killable.wait()  # the operator killed after the end: give its successor a few passes
        time.sleep(5)
        settled = status_of(kube, ns, RUN)
    finally:
        writer.stop()
        killable.wait()
        killable.op.stop()
        print(f"--- faulted operator log (tail) ---\n{killable.op.tail(80)}")
    injector = injectors[0]
    def evaluations_of_attempt_1(kubelet: Kubelet) -> dict[int, float]:
        return {e.step: e.metrics[GENERAL] for e in trainer_events(kubelet.attempt(1))
                if isinstance(e, Evaluated) and not e.is_base}
    wall = time.monotonic() - suite_start
    log_text = (tmp_path / "operator-chaos.log").read_text(errors="replace")
    figures = {
        "seed": SEED, "schedule": [str(f) for f in faults],
        "fired": [f"{t:.1f} s {f} -> {note}" for t, f, note in injector.fired],
        "faults_injected": sum(injector.counts().values()), "by_kind": dict(injector.counts()),
        "writer": dict(writer.writes),
        "conflicts_in_operator_log": log_text.count("changed while") + log_text.count("409"),
        "gone_410_in_operator_log": log_text.count("410"),
        "max_attempts_with_pods": {"clean": clean.max_attempts_with_pods, "faulted": faulty.max_attempts_with_pods},
        "checkpoints_verified": {"clean": len(clean.verified), "faulted": len(faulty.verified)},
        "checkpoints_broken": faulty.broken, "incomplete_saves_without_manifest": faulty.incomplete,
        "saved_but_missing": sorted(faulty.saved - set(faulty.verified)),
        "seconds": {"clean": round(clean.seconds), "faulted": round(faulty.seconds), "suite": round(wall)},
        "end": {k: (clean.status.get(k), faulty.status.get(k)) for k in
                ("phase", "rollbacks", "restarts", "attempt", "bestCheckpoint")},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print("[faults] " + json.dumps(figures, indent=2))
    print(f"[faults] suite wall time {wall:.0f} s")

    # every fault of the schedule was injected
    assert len(injector.fired) == len(faults), injector.fired
    assert injector.counts()["kill-operator"] >= 10 and injector.counts()["kill-trainer"] >= 1

    # at most one attempt's pods at a time
    assert clean.max_attempts_with_pods == 1 and faulty.max_attempts_with_pods == 1

    # no checkpoint lost or corrupted: every manifest verifies byte for byte, and every save a
    # trainer reported is among them
    assert clean.broken == [] and faulty.broken == []
    assert faulty.saved <= set(faulty.verified), faulty.saved - set(faulty.verified)
    assert clean.saved <= set(clean.verified)

    # the base was never written
    assert sha256_of_tree(base) == base_digest

    # the same end, the same decision, each evaluation counted once
    a, b = clean.status, faulty.status
    assert b == settled, "the finished run changed after its operator was killed and restarted"
    assert (a["phase"], a["rollbacks"]) == (b["phase"], b["rollbacks"]) == ("Succeeded", 1)
    assert a["baseMetrics"] == pytest.approx(b["baseMetrics"])
    assert len(a["history"]) == len(b["history"]) == 1
    ha, hb = a["history"][0], b["history"][0]
    assert {k: ha[k] for k in ("attempt", "gate", "metric", "target")} == \
        {k: hb[k] for k in ("attempt", "gate", "metric", "target")}
    # The gate judges the attempt's newest evaluation (policy/gates.py), so the value recorded is
    # that of whichever breaching evaluation was newest when the pass ran: a matter of timing. It
    # must be one of attempt 1's breaching evaluations. The trainers are deterministic: where both
    # runs' first attempts evaluated the same step (the faulted one may have run on longer before
    # it was stopped), they measured the same.
    assert ha["baseline"] == pytest.approx(hb["baseline"])
    evals_a, evals_b = evaluations_of_attempt_1(clean_kubelet), evaluations_of_attempt_1(kubelet)
    common = sorted(evals_a.keys() & evals_b.keys())
    assert common and [evals_a[k] for k in common] == pytest.approx([evals_b[k] for k in common])
    limit = hb["baseline"] * (1 + THRESHOLD)
    assert any(v == pytest.approx(hb["value"]) and v > limit for v in evals_b.values()), (hb, evals_b)
    chosen = {s["name"]: s for s in a["checkpoints"]}[a["bestCheckpoint"]]
    chosen_f = {s["name"]: s for s in b["checkpoints"]}[b["bestCheckpoint"]]
    assert chosen["step"] == chosen_f["step"] and chosen_f["passedGates"]
    assert chosen["metrics"] == pytest.approx(chosen_f["metrics"], rel=1e-4)
