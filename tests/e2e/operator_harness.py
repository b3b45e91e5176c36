"""Driving the operator process in end-to-end tests: start/restart it against the test
cluster, and read what it did (runs, status, Jobs, trainer configs, Kubernetes Events)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from tests.cluster.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-webhook-token"

class OperatorProcess:
    """`python -m cpt_operator.kube` with the test cluster's kubeconfig; restartable."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log_path = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def port(self, name: str) -> int:
        return int(self.env[name])

    def start(self) -> "OperatorProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cpt_operator.kube"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"operator exited:\n{self.tail()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port('CPT_HEALTH_PORT')}/healthz", timeout=1)
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"operator not healthy after 60 s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port('CPT_METRICS_PORT')}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def post_alert(self, payload: dict[str, Any], token: str = TOKEN) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port('CPT_WEBHOOK_PORT')}/alerts",
                                     data=json.dumps(payload).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def get_run(kube: Any, ns: str, name: str) -> dict[str, Any]:
    return kube.kubectl_json("get", "cptrun", name, "-n", ns)


def status_of(kube: Any, ns: str, name: str) -> dict[str, Any]:
    return get_run(kube, ns, name).get("status") or {}


def job_names(kube: Any, ns: str, run: str) -> list[str]:
    jobs = kube.kubectl_json("get", "jobs", "-n", ns, "-l", f"cpt.mlops.dev/run={run}")["items"]
    return sorted(j["metadata"]["name"] for j in jobs if not j["metadata"].get("deletionTimestamp"))


def trainer_config(kube: Any, ns: str, name: str) -> dict[str, Any]:
    cm = kube.kubectl_json("get", "configmap", name, "-n", ns)
    return json.loads(cm["data"]["trainer-config.json"])


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def events(kube: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return kube.kubectl_json("get", "events", "-n", ns, "--field-selector",
                             f"involvedObject.name={name},involvedObject.kind=CptRun")["items"]


def install_crd(kube: Any) -> None:
    kube.kubectl("apply", "-f", str(ROOT / "crds" / "cptrun.yaml"))
    kube.wait_established("cptruns.cpt.mlops.dev")


def operator_env(kube: Any, prometheus: Any, s3_server: Any) -> dict[str, str]:
    """The chart's environment for one standalone operator on this host (own free ports)."""
    return {**os.environ, **s3_server.env, "KUBECONFIG": str(kube.kubeconfig),
            "PROMETHEUS_URL": prometheus.url, "CPT_WEBHOOK_TOKEN": TOKEN,
            "CPT_TRAINER_IMAGE": "registry.invalid/cpt-trainer:e2e", "CPT_RECONCILE_INTERVAL": "1",
            "CPT_METRICS_PORT": str(free_port()), "CPT_WEBHOOK_PORT": str(free_port()),
            "CPT_HEALTH_PORT": str(free_port()), "CPT_PEERING_NAME": "", "CPT_NAMESPACES": ""}


def running_operator(kube: Any, prometheus: Any, s3_server: Any, log: Path) -> Iterator[OperatorProcess]:
    """A started operator for a fixture to yield; its log tail is printed when it stops."""
    op = OperatorProcess(operator_env(kube, prometheus, s3_server), log).start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.tail(200)}")
