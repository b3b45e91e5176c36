"""Operator benchmark on the real control plane of tests/cluster.

  python bench/bench_operator.py [--runs 200] [--interval 5] [--settle 30] [--soak 0] [--out FILE]

Measures, with the operator running as in production (`python -m cpt_operator.kube`, one process):
  * time from creating N CptRuns at once until all N Jobs exist;
  * p50 / p99 of one reconcile pass (the operator's cpt_reconcile_seconds histogram, steady state);
  * the operator's resident memory (now and peak), and again after `--soak` more seconds of the
    steady state (memory must not grow over a long run);
  * breach-to-new-attempt latency: a trainer's exported general perplexity crosses a gate, the
    real Prometheus scrapes it (1 s), the operator deletes the Job and creates attempt 2.
Pods are kwok's (nothing runs in them); the figures are the control plane's own.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import cluster  # noqa: E402  (tests/cluster/cluster.py)

from cpt_api.manifest import FileEntry, Lineage, Manifest  # noqa: E402


def cptrun(name: str, bucket: str, pool: str = "cpu") -> dict[str, Any]:
    return {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": name}, "spec": {
        "baseModel": {"uri": f"s3://{bucket}/models/base"},
        "data": {"sources": [{"name": "d", "role": "domain", "uri": f"s3://{bucket}/d/*.jsonl", "weight": 0.8},
                             {"name": "r", "role": "replay", "uri": f"s3://{bucket}/r/*.jsonl", "weight": 0.2}]},
        "budget": {"steps": 1000}, "schedule": {"warmupSteps": 10},
        "checkpoint": {"uri": f"s3://{bucket}/runs/{name}"},
        "evaluation": {"suites": [{"name": "general", "kind": "general", "uri": f"s3://{bucket}/e.jsonl"}]},
        "gates": [{"name": "general-regression", "suite": "general", "threshold": 0.1}],
        "resources": {"nodes": 1, "gpusPerNode": 1 if pool == "h100" else 0, "nodeSelector": {"pool": pool}},
    }}


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    total = buckets[-1][1]
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_bound, prev_count = bound, count
    return prev_bound


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    buckets, total, count = [], 0.0, 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return sorted(buckets), total, count


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: unlike latency, not inflated by what
    else runs on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_count(kube: Any, ns: str) -> int:
    out = kube.kubectl("get", "jobs", "-n", ns, "-o", "name")
    return len(out.split())


def checkpoint(s3: Any, bucket: str, run: str, step: int, general: float) -> str:
    fs, name = s3.filesystem(), f"attempt-001/step-{step:08d}"
    payload = os.urandom(1024)
    with fs.open(f"{bucket}/runs/{run}/{name}/model.bin", "wb") as f:
        f.write(payload)
    manifest = Manifest(step=step, tokens=step, created_at="2026-01-01T00:00:00Z",
                        evals={"general.perplexity": general},
                        lineage=Lineage(run=run, attempt=1, parent=None, base_uri="s3://m", restore_mode="weightsOnly",
                                        data_version="d", tokenizer_hash="t", config_hash="c"),
                        files={"model.bin": FileEntry(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())})
    with fs.open(f"{bucket}/runs/{run}/{name}/manifest.json", "w") as f:
        f.write(manifest.model_dump_json(by_alias=True))
    return name


def breach_latency(kube: Any, prom: Any, s3: Any, ns: str, bucket: str) -> float:
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import MetricsHandler

    kube.apply(cptrun("breach", bucket, pool="h100"), namespace=ns)
    kube.wait_for(lambda: job_count(kube, ns)
                  and kube.kubectl_result("get", "job", "breach-a1", "-n", ns).returncode == 0,
                  "job breach-a1", timeout=120)
    name = checkpoint(s3, bucket, "breach", 10, 10.1)
    registry = CollectorRegistry()
    labels = {"run": "breach", "namespace": ns, "attempt": "1"}
    metric = Gauge("cpt_eval_metric", "", [*labels, "suite", "metric"], registry=registry)
    base = Gauge("cpt_eval_base_metric", "", [*labels, "suite", "metric"], registry=registry)
    step = Gauge("cpt_eval_step", "", list(labels), registry=registry)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    prom.add_target(address)
    try:
        base.labels(**labels, suite="general", metric="perplexity").set(10.0)
        step.labels(**labels).set(10)
        metric.labels(**labels, suite="general", metric="perplexity").set(10.1)
        kube.wait_for(lambda: (kube.kubectl_json("get", "cptrun", "breach", "-n", ns).get("status") or {})
                      .get("lastGoodCheckpoint") == name, "last good checkpoint", timeout=120)
        start = time.monotonic()
        step.labels(**labels).set(20)
        metric.labels(**labels, suite="general", metric="perplexity").set(14.0)
        kube.wait_for(lambda: kube.kubectl_result("get", "job", "breach-a2", "-n", ns).returncode == 0,
                      "job breach-a2", timeout=120, interval=0.1)
        return time.monotonic() - start
    finally:
        prom.remove_target(address)
        server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--interval", type=float, default=5.0, help="operator reconcile interval (s)")
    parser.add_argument("--settle", type=float, default=30.0, help="steady-state seconds measured")
    parser.add_argument("--soak", type=float, default=0.0,
                        help="then this many seconds more before memory is read again")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    nodes = (*cluster.DEFAULT_NODES, *(cluster.NodeSpec(f"cpu-{i}", "cpu") for i in range(1, 3)))
    with cluster.running(cluster.KubeCluster(nodes=nodes)) as kube, \
            cluster.running(cluster.Prometheus()) as prom, cluster.running(cluster.S3Server()) as s3:
        kube.kubectl("apply", "-f", str(ROOT / "crds" / "cptrun.yaml"))
        kube.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd/cptruns.cpt.mlops.dev")
        ns, bucket = "bench", s3.create_bucket()
        kube.kubectl("create", "namespace", ns)
        kube.wait_for_default_service_account(ns)
        ports = {k: str(cluster.free_port()) for k in ("CPT_METRICS_PORT", "CPT_WEBHOOK_PORT", "CPT_HEALTH_PORT")}
        env = {**os.environ, **s3.env, **ports, "KUBECONFIG": str(kube.kubeconfig), "PROMETHEUS_URL": prom.url,
               "CPT_RECONCILE_INTERVAL": str(args.interval), "CPT_WEBHOOK_TOKEN": "bench"}
        log = open(kube.root / "operator.log", "wb")
        op = subprocess.Popen([sys.executable, "-m", "cpt_operator.kube"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
        metrics_url = f"http://127.0.0.1:{ports['CPT_METRICS_PORT']}/metrics"
        try:
            kube.wait_for(lambda: cluster._http_ok(metrics_url), "operator metrics", timeout=60)
            items = [cptrun(f"run-{i:04d}", bucket) for i in range(args.runs)]
            start = time.monotonic()
            kube.kubectl("create", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                             "items": items}), timeout=300)
            applied = time.monotonic() - start
            kube.wait_for(lambda: job_count(kube, ns) >= args.runs, f"{args.runs} jobs", timeout=600, interval=0.5)
            all_jobs = time.monotonic() - start
            before, cpu0 = urllib.request.urlopen(metrics_url).read().decode(), cpu_s(op.pid)
            time.sleep(args.settle)
            after, cpu1 = urllib.request.urlopen(metrics_url).read().decode(), cpu_s(op.pid)
            latency = breach_latency(kube, prom, s3, ns, bucket)
            rss, peak = rss_mb(op.pid)
            soak_start = time.monotonic()
            while time.monotonic() - soak_start < args.soak:
                time.sleep(5)
                assert op.poll() is None, "the operator exited"
            soaked = rss_mb(op.pid)[0]
        finally:
            os.killpg(op.pid, signal.SIGTERM)
            op.wait(30)
    b0, s0, c0 = histogram(before, "cpt_reconcile_seconds")
    b1, s1, c1 = histogram(after, "cpt_reconcile_seconds")
    steady = [(bound, n1 - n0) for (bound, n1), (_, n0) in zip(b1, b0)]
    figures = {
        "runs": args.runs, "interval_s": args.interval, "create_s": round(applied, 2),
        "all_jobs_created_s": round(all_jobs, 2),
        "passes_per_s": round((c1 - c0) / args.settle, 1),
        "reconcile_p50_ms": round(1000 * quantile(steady, 0.5), 1),
        "reconcile_p99_ms": round(1000 * quantile(steady, 0.99), 1),
        "reconcile_mean_ms": round(1000 * (s1 - s0) / max(c1 - c0, 1), 1),
        "operator_cpu_ms_per_pass": round(1000 * (cpu1 - cpu0) / max(c1 - c0, 1), 2),
        "operator_cpu_cores": round((cpu1 - cpu0) / args.settle, 2),
        "operator_rss_mb": round(rss, 1), "operator_peak_rss_mb": round(peak, 1),
        **({"soak_s": args.soak, "operator_rss_after_soak_mb": round(soaked, 1)} if args.soak else {}),
        "breach_to_new_attempt_s": round(latency, 2),
        "cpus": os.cpu_count(),
    }
    print(f"| {'figure':<26} | value |\n|{'-' * 28}|-------|")
    for key, value in figures.items():
        print(f"| {key:<26} | {value} |")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
