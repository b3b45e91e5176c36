"""Training throughput with evaluation inline, separate, and none at all, in one script.

The same CptRun (a tiny Llama on license text with Python replay, a domain and a general
perplexity suite and a generation suite) runs three times through `cptctl run`: without
evaluation, with `evaluation.placement: inline`, and with `placement: separate` (each evaluated
step saved as a checkpoint and evaluated by a process of its own). The figure is the trainer's
tokens per second over its whole attempt, from its `started` to its `finished` event (setup
excluded; evaluation stalls, checkpoint stalls and the steps themselves included), as a ratio to
the run without evaluation.

Stand-in for separate resources: on a cluster the evaluation Job runs on its own GPUs; here every
process gets one thread (OMP_NUM_THREADS=1), so on a machine with two or more cores the trainer
and one evaluation each have a core, as on their own nodes. Usage:
python bench/bench_eval_placement.py [--steps 24] [--every 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from cpt_api.events import Finished, Started, parse_event  # noqa: E402


def spec(tmp: Path, steps: int, every: int) -> dict[str, Any]:
    from tests.conftest import build_tiny_model
    from tests.integration.harness import jsonl, python_files

    base = build_tiny_model(tmp / "base", hidden=128, layers=4)
    files = python_files()
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    prompts = jsonl(tmp / "prompts.jsonl", [p.read_text()[:200] for p in files[48:56]])
    return {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": "/usr/share/common-licenses/*", "weight": 0.9},
            {"name": "code", "role": "replay", "format": "jsonl", "weight": 0.1,
             "uri": str(jsonl(tmp / "code.jsonl", [p.read_text() for p in files[:40]]))},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 128, "boundary": "documentMask"},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmupSteps": 2},
        "budget": {"steps": steps},
        "training": {"microBatchSize": 8},
        "checkpoint": {"every": every, "keep": 50},
        "evaluation": {"every": every, "suites": [
            {"name": "legal", "kind": "domain", "maxSamples": 16,
             "uri": str(jsonl(tmp / "legal-eval.jsonl", [p.read_text()[:3000] for p in licenses[:16]]))},
            {"name": "general", "kind": "general", "maxSamples": 16,
             "uri": str(jsonl(tmp / "code-eval.jsonl", [p.read_text()[:3000] for p in files[40:56]]))},
            {"name": "json", "kind": "behavior", "metric": "json_valid", "uri": str(prompts), "maxNewTokens": 24},
        ]},
    }


def run(tmp: Path, name: str, doc: dict[str, Any]) -> dict[str, float]:
    file = tmp / f"{name}.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": name}, "spec": doc}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                           "--no-progress"], cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    lines = (tmp / "runs" / name / "attempt-001" / "events.jsonl").read_text().splitlines()
    events = [parse_event(line) for line in lines if line.strip()]
    started = next(e for e in events if isinstance(e, Started))
    finished = next(e for e in events if isinstance(e, Finished))
    return {"tokens": finished.tokens, "trainer_s": finished.time - started.time,
            "tokens_per_s": finished.tokens / (finished.time - started.time), "run_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        doc = spec(tmp, args.steps, args.every)
        for name in ("none", "inline", "separate"):
            variant = json.loads(json.dumps(doc))
            if name == "none":
                del variant["evaluation"]
            else:
                variant["evaluation"]["placement"] = name
            results[name] = run(tmp, f"bench-{name}", variant)
            print(f"{name:9s} {results[name]['tokens_per_s']:8.0f} tok/s over {results[name]['trainer_s']:.1f} s "
                  f"of training ({results[name]['run_s']:.1f} s end to end)", flush=True)
    none = results["none"]["tokens_per_s"]
    ratios = {k: v["tokens_per_s"] / none for k, v in results.items()}
    print(f"inline {ratios['inline']:.3f}x, separate {ratios['separate']:.3f}x the run without evaluation")
    out = ROOT / "bench" / "results" / "eval_placement.json"
    out.write_text(json.dumps({"steps": args.steps, "every": args.every, "runs": results, "ratios": ratios,
                               "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
