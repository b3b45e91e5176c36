"""Rollback overhead: from the evaluation that breaches a gate to the next attempt's first step.

Runs a CptRun whose general gate is made to breach (a tiny model first taught Python, then
trained on license text at a far too high LR), through `cptctl run`, and reads the timeline from
the run's own event logs:

  breach    the Evaluated event whose result fired the gate (attempt 1)
  resumed   the first Progress event of attempt 2 (its first training step is done)
  overhead  resumed - breach - one step of attempt 2 (the step itself is training, not overhead)

and compares it with a checkpoint interval of attempt 1 (time between two CheckpointSaved) and
with the whole run. Usage: python bench/bench_rollback.py [--steps-per-checkpoint N]

`--demo` measures the same path on the demo model (SmolLM2-135M, examples/demo/legal.yaml after
`python examples/demo/prepare.py`): once the first checkpoint exists, a rollback to it is
requested (`cptctl rollback`, the path a gate takes), and the time from the request to the next
attempt's first step is compared with the demo's checkpoint interval.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from cpt_api.events import parse_event  # noqa: E402


def scenario(tmp: Path, every: int) -> Path:
    from tests.conftest import build_tiny_model
    from tests.integration.harness import jsonl, pretrain_on_code, python_files

    base = pretrain_on_code(build_tiny_model(tmp / "random", hidden=128, layers=4), tmp / "base")
    files = python_files()
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    spec = {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": "/usr/share/common-licenses/*", "weight": 0.9},
            {"name": "code", "role": "replay", "format": "jsonl", "weight": 0.1,
             "uri": str(jsonl(tmp / "code.jsonl", [p.read_text() for p in files[:40]]))},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 128, "boundary": "documentMask"},
        "optimizer": {"lr": 1e-2, "weightDecay": 0.0},
        "schedule": {"warmupSteps": every, "decay": "constant"},
        "budget": {"steps": 6 * every},
        "training": {"microBatchSize": 8},
        "checkpoint": {"every": every, "keep": 10},
        "evaluation": {"every": every, "suites": [
            {"name": "legal", "kind": "domain", "maxSamples": 4,
             "uri": str(jsonl(tmp / "legal-eval.jsonl", [p.read_text()[:1500] for p in licenses[:4]]))},
            {"name": "general", "kind": "general", "maxSamples": 8,
             "uri": str(jsonl(tmp / "code-eval.jsonl", [p.read_text()[:1500] for p in files[40:48]]))},
        ]},
        "gates": [{"name": "forgetting", "suite": "general", "threshold": 0.25, "action": "rollback",
                   "rollbackTo": "lastGood", "tune": {"lrFactor": 0.02, "replayDelta": 0.3}}],
        "stopPolicy": {"maxRollbacks": 3},
    }
    file = tmp / "rollback.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": "bench-rollback"}, "spec": spec}))
    return file


def events(run_dir: Path, attempt: int) -> list:
    path = run_dir / f"attempt-{attempt:03d}" / "events.jsonl"
    return [parse_event(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float = 1800.0, poll: float = 0.2) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo run did not get there in time")
        time.sleep(poll)


def demo(out: str) -> int:
    """Rollback overhead on the demo model through a requested rollback."""
    import time

    with tempfile.TemporaryDirectory(prefix="bench-rollback-demo-") as tmp:
        doc = yaml.safe_load((ROOT / "examples" / "demo" / "legal.yaml").read_text())
        doc["spec"]["budget"] = {"steps": 2 * doc["spec"]["checkpoint"]["every"]}
        file = Path(tmp) / "demo.yaml"
        file.write_text(yaml.safe_dump(doc))
        run_dir = Path(tmp) / "run"
        cli = [sys.executable, "-m", "cpt_operator.cli"]
        proc = subprocess.Popen([*cli, "run", str(file), "--run-dir", str(run_dir), "--nproc", "1",
                                 "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        every = doc["spec"]["checkpoint"]["every"]
        first = f"attempt-001/step-{every:08d}"
        wait_for(lambda: (run_dir / "checkpoints" / first / "manifest.json").exists())
        requested = time.time()
        subprocess.run([*cli, "rollback", str(run_dir), "--to", first], cwd=ROOT, check=True,
                       capture_output=True)
        log2 = run_dir / "attempt-002" / "events.jsonl"
        wait_for(lambda: log2.exists() and '"progress"' in log2.read_text())
        subprocess.run([*cli, "stop", str(run_dir)], cwd=ROOT, capture_output=True)
        proc.wait(timeout=600)
        one = events(run_dir, 1)
        resumed = next(e for e in events(run_dir, 2) if e.event == "progress")
        progress = [e for e in one if e.event == "progress"]
        step_s = sum(1 / e.tokens_per_s for e in progress) / len(progress) * progress[0].tokens
        saved = next(e for e in one if e.event == "checkpoint")
        # One interval: every step from the first to the checkpoint, its evaluation and save.
        interval = saved.time - progress[0].time + step_s
        overhead = resumed.time - requested - step_s
    result = {"benchmark": "rollback overhead, demo model (requested rollback -> first step)",
              "model": "SmolLM2-135M-Instruct (GGUF), CPU", "steps_per_checkpoint": every,
              "overhead_s": overhead, "checkpoint_interval_s": interval,
              "overhead_per_checkpoint_interval": overhead / interval, "step_s": step_s}
    print(json.dumps(result, indent=2))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"rollback overhead {overhead:.1f} s = {overhead / interval:.0%} of a demo checkpoint "
          f"interval ({interval:.0f} s); written to {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-per-checkpoint", type=int, default=8)
    p.add_argument("--demo", action="store_true", help="measure on the demo model instead")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.demo:
        return demo(args.out or str(ROOT / "bench" / "results" / "rollback-demo.json"))
    args.out = args.out or str(ROOT / "bench" / "results" / "rollback.json")
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp:
        tmpdir = Path(tmp)
        file = scenario(tmpdir, args.steps_per_checkpoint)
        done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                               "--no-progress"], cwd=tmpdir, capture_output=True, text=True)
        print(done.stdout[-2000:])
        run_dir = tmpdir / "runs" / "bench-rollback"
        status = json.loads((run_dir / "status.json").read_text())
        if status["rollbacks"] < 1:
            print("the gate did not breach; nothing to measure", file=sys.stderr)
            return 1
        first, second = events(run_dir, 1), events(run_dir, 2)
        record = status["history"][0]
        breach = next(e for e in reversed(first) if e.event == "evaluated" and not e.is_base
                      and e.metrics.get(record["metric"]) == record["value"])
        progress = [e for e in second if e.event == "progress"]
        step_s = (progress[1].time - progress[0].time) if len(progress) > 1 else 0.0
        overhead = progress[0].time - breach.time - step_s
        saves = [e.time for e in first if e.event == "checkpoint"]
        interval = min(b - a for a, b in zip(saves, saves[1:])) if len(saves) > 1 else float("nan")
        finished = [e for n in range(1, status["attempt"] + 1) for e in events(run_dir, n)
                    if e.event == "finished"]
        started = first[0].time
        total = max(e.time for e in finished) - started
    result = {
        "benchmark": "rollback overhead (breaching eval -> next attempt's first step)",
        "model": "random Llama, 4 layers, hidden 128, taught Python first; CPU",
        "steps_per_checkpoint": args.steps_per_checkpoint,
        "overhead_s": overhead, "checkpoint_interval_s": interval, "total_run_s": total,
        "overhead_per_checkpoint_interval": overhead / interval,
        "overhead_share_of_run": overhead / total,
        "rollback_target": record["target"], "rollbacks": status["rollbacks"],
        "phase": status["phase"],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"rollback overhead {overhead:.1f} s = {result['overhead_per_checkpoint_interval']:.0%} of a "
          f"checkpoint interval, {result['overhead_share_of_run']:.0%} of the run; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
