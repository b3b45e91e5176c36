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

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from cpt_api.events import Evaluated
from tests.cluster.cluster import Toxiproxy
from tests.e2e.full_loop import (GENERAL, RUN, THRESHOLD, FaultFree, Kubelet, drive, s3_secret, saved_by,
                                 sha256_of_tree, trainer_events)
from tests.e2e.operator_harness import OperatorProcess, operator_env, status_of
from tests.faults.chaos import Injector, Writer, schedule, sigkill_group

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3,
              pytest.mark.slow, pytest.mark.timeout(1200)]

SEED = int(os.environ.get("CPT_FAULTS_SEED", "14"))
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.json"


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


# -- the faults, as `drive` watches the run ---------------------------------------------------
@dataclass
class Chaos:
    """Fires the schedule's faults as the run reaches their milestones, and holds the end of a
    run that ended before every fault fired (for 15 s after it succeeded)."""
    injector: Injector
    start: float = field(default_factory=time.monotonic)

    def ended(self, status: dict[str, Any], kubelet: Kubelet, ended: bool) -> bool:
        self.injector.tick(milestones(status, kubelet))
        if ended and len(self.injector.fired) < len(self.injector.faults):
            return time.monotonic() - self.injector.reached.get("succeeded", self.start) > 15
        return ended

    def close(self) -> None:
        self.injector.clear()


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
        fault_free_loop: FaultFree) -> None:
    kube = kube_cluster
    faults = schedule(SEED)
    print(f"\n[faults] seed {SEED}; schedule:\n" + "\n".join(f"  {f}" for f in faults))
    # the fault-free run: driven once a session by an operator watching only its namespace (the
    # full-loop test asserts on the same run)
    clean, clean_kubelet = fault_free_loop.outcome, fault_free_loop.kubelet
    base = Path(fault_free_loop.run["spec"]["baseModel"]["uri"])
    faulty_bucket = s3_server.create_bucket()
    faulty_run = json.loads(json.dumps(fault_free_loop.run).replace(f"s3://{fault_free_loop.bucket}/",
                                                                    f"s3://{faulty_bucket}/"))
    print(f"[faults] fault-free run: {clean.status['phase']} in {clean.seconds:.0f} s, "
          f"chosen {clean.status.get('bestCheckpoint')}")
    suite_start = time.monotonic()

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

    def chaos(kubelet: Kubelet) -> Chaos:
        injectors.append(Injector(faults, toxiproxy, kube.etcd_url, killable.kill,
                                  lambda first: kill_trainer(kubelet, first),
                                  lambda: str(status_of(kube, ns, RUN).get("phase"))))
        return Chaos(injectors[0])

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
    # the fault-free run's own time (driven by the session's fixture) and this test's
    wall = clean.seconds + time.monotonic() - suite_start
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
    assert sha256_of_tree(base) == fault_free_loop.base_digest

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
