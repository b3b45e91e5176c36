"""The host plan against a resumed attempt: an 89 M-parameter Llama on 2 CPU ranks under fsdp,
with asynchronous checkpoints.

A resumed attempt is what the plan is for: it forks its data worker after restoring AdamW's
state, which the worker then keeps as the optimizer rewrites it, and from its first checkpoint on
it holds the staging copy. A rank's host memory is its trainer's peak resident memory (VmHWM,
read every 50 ms) plus the most its data worker held alone (private pages, read every 0.5 s), so
the libraries they share count once. The plan's training moment for the same spec is printed
beside it; tests/unit/policy/test_plan_against_bench.py keeps the planner within 25 % of the
recorded figure.

    python bench/bench_host_memory.py        # ~2 min on 2 cores; writes bench/results/host_memory.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpt_api.spec import CptRunSpec  # noqa: E402
from cpt_operator.policy.memory_host import host_estimate  # noqa: E402
from cpt_operator.policy.model_shape import ModelShape  # noqa: E402
from tests.conftest import build_tiny_model, corpora_in  # noqa: E402
from tests.integration.harness import log_tail, processes_of, run, tiny_spec, write_config  # noqa: E402

RANKS = 2
GIB = 1 << 30


def _kib(path: Path, *keys: str) -> dict[str, int]:
    found = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0]) * 1024
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class Sampler(threading.Thread):
    """The peak host memory of each rank of the trainer started on `config`: its trainer's peak
    resident memory (VmHWM, exact) and the most its data worker held alone (sampled every 0.5 s:
    reading a process's page tables is not free, and those pages only accumulate)."""

    def __init__(self, config: Path):
        super().__init__(daemon=True)
        self.config, self.stop = config, threading.Event()
        self.trainer: dict[int, int] = {}
        self.worker: dict[int, int] = {}

    def run(self) -> None:
        ticks = 0
        while not self.stop.is_set():
            try:
                self._sample(workers=ticks % 10 == 0)
            except (OSError, ValueError, IndexError, KeyError):  # a process exited while it was read
                pass
            ticks += 1
            time.sleep(0.05)

    def _sample(self, workers: bool) -> None:
        pids = processes_of(self.config)
        parents = {pid: _parent(pid) for pid in pids}
        for rank in (pid for pid, parent in parents.items() if parent in pids and parents[parent] not in pids):
            self.trainer[rank] = max(self.trainer.get(rank, 0), _kib(Path(f"/proc/{rank}/status"), "VmHWM")["VmHWM"])
            for worker in (pid for pid, parent in parents.items() if parent == rank and workers):
                alone = sum(_kib(Path(f"/proc/{worker}/smaps_rollup"), "Private_Clean", "Private_Dirty").values())
                self.worker[rank] = max(self.worker.get(rank, 0), alone)

    def peak(self) -> int:
        """The larger rank's trainer and data worker."""
        return max(hwm + self.worker.get(rank, 0) for rank, hwm in self.trainer.items())


def measured(config: Path) -> Sampler:
    sampler = Sampler(config)
    sampler.start()
    try:
        code = run(config, nproc=RANKS, timeout=600)
    finally:
        sampler.stop.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(log_tail(config))
    return sampler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host_memory.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-host-memory-"))
    model = build_tiny_model(tmp / "model", layers=6, hidden=1280)
    spec = tiny_spec(model, corpora_in(tmp / "corpora"), budget={"steps": 1}, checkpoint={"every": 1, "keep": 5},
                     packing={"seqLen": 64, "boundary": "documentMask"}, schedule={"warmupSteps": 0},
                     training={"microBatchSize": 1, "gradAccumulation": 1, "parallelism": {"strategy": "fsdp"}},
                     resources={"nprocPerNode": RANKS})
    first = write_config(tmp, spec, attempt=1)
    if run(first, nproc=RANKS, timeout=600) != 0:
        raise RuntimeError(log_tail(first))
    # resumed at step 1: it saves at step 2, from then on with the staging copy, and trains step 3
    spec = {**spec, "budget": {"steps": 3}, "checkpoint": {"every": 2, "keep": 5}}
    step1 = tmp / "checkpoints" / "attempt-001" / "step-00000001"
    sampler = measured(write_config(tmp, spec, attempt=2, restore_from=str(step1), restore_mode="fullState"))
    model_config: dict[str, Any] = json.loads((model / "config.json").read_text())
    plan = host_estimate(CptRunSpec.model_validate(spec), ModelShape.from_hf_config(model_config))
    result = {"spec": spec, "model_config": model_config, "measured_rank_peak": sampler.peak(),
              "trainers": list(sampler.trainer.values()), "data_workers_alone": list(sampler.worker.values()),
              "planned_rank": plan.rank, "planned_moment": plan.peak_moment}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{plan.rank / GIB:.2f} GiB planned a rank ({plan.peak_moment}: "
          f"{ {k: round(v / GIB, 2) for k, v in plan.parts().items()} }), measured {sampler.peak() / GIB:.2f} GiB "
          f"(trainers {[round(v / GIB, 2) for v in sampler.trainer.values()]} GiB, data workers alone "
          f"{[round(v / GIB, 2) for v in sampler.worker.values()]} GiB): {plan.rank / sampler.peak():.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
