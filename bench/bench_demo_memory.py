"""Peak host memory of the demo's trainer process tree, against the memory planner.

Runs `cptctl run examples/demo/legal.yaml --fresh` (after `python examples/demo/prepare.py`) and
samples, twice a second, every process under it started with `-m cpt_trainer` (the trainer and
the DataLoader worker it forks): RSS and PSS (shared pages split between the processes sharing
them). `/usr/bin/time -v` on `cptctl` is not enough: it reports the largest single process, not
the tree. Peaks shorter than the sampling interval can be missed; each process's own VmHWM
(exact) is reported too.

Usage: python bench/bench_demo_memory.py [--spec examples/demo/legal.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def _kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


def descendants(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", encoding="utf-8") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue  # gone meanwhile
    return found


def trainer_processes(root: int) -> dict[int, dict[str, int]]:
    """RSS, PSS and VmHWM of every `-m cpt_trainer` process started under `root`."""
    found = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"cpt_trainer" not in argv:
                continue
            found[pid] = {**_kib(f"/proc/{pid}/status", ("VmRSS", "VmHWM")),
                          **_kib(f"/proc/{pid}/smaps_rollup", ("Pss",))}
        except (OSError, ValueError):
            continue
    return found


def measure(command: list[str], interval: float = 0.5) -> dict[str, float]:
    proc = subprocess.Popen(command)
    peak_rss = peak_pss = 0
    hwm: dict[int, int] = {}
    while proc.poll() is None:
        procs = trainer_processes(proc.pid)
        peak_rss = max(peak_rss, sum(p.get("VmRSS", 0) for p in procs.values()))
        peak_pss = max(peak_pss, sum(p.get("Pss", 0) for p in procs.values()))
        for pid, p in procs.items():
            hwm[pid] = max(hwm.get(pid, 0), p.get("VmHWM", 0))
        time.sleep(interval)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}")
    per_process = sorted(hwm.values(), reverse=True)
    return {"tree_rss_gib": peak_rss / GIB, "tree_pss_gib": peak_pss / GIB,
            "trainer_hwm_gib": per_process[0] / GIB if per_process else 0.0,
            "worker_hwm_gib": per_process[1] / GIB if len(per_process) > 1 else 0.0}


def planned(spec_path: str) -> float:
    """A rank's planned host memory at its peak: its process, the step and the data worker
    (`cptctl run` of one process starts no launcher)."""
    from cpt_api.load import load_run
    from cpt_operator.base_shape import read_shape
    from cpt_operator.policy.memory_host import host_estimate

    spec = load_run(spec_path).spec
    return host_estimate(spec, read_shape(spec.base_model)).rank / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="examples/demo/legal.yaml")
    args = parser.parse_args()
    os.chdir(ROOT)  # the demo spec's relative paths are resolved from the repository root
    result = measure([sys.executable, "-m", "cpt_operator.cli", "run", args.spec, "--fresh", "--no-progress"])
    result["planned_gib"] = planned(args.spec)
    result["ratio"] = result["tree_rss_gib"] / result["planned_gib"]
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "demo_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
