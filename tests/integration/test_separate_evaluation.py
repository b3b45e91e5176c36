"""`evaluation.placement: separate` through `cptctl run`: the trainer never evaluates, each
checkpoint (and the base) is evaluated by a process of its own, and a gate breach those
processes find still rolls the run back to its last good checkpoint.

The scenario is test_gate_rollback's (a tiny Llama taught Python, then trained on license text
at a far too high LR), with the same suites and gate. A second test checks that a separate
evaluation of a checkpoint measures what the trainer measured inline at that step.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_api.manifest import EVENTS, eval_record_name
from cpt_api.store import list_checkpoints
from tests.integration.harness import forgetting_files, pretrain_on_code

pytestmark = pytest.mark.slow


def _spec(base: Path, corpora: dict[str, Path], files: dict[str, Path], *, placement: str, steps: int,
          gated: bool) -> dict[str, Any]:
    return {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.9},
            {"name": "code", "role": "replay", "uri": str(files["code_train"]), "format": "jsonl", "weight": 0.1},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-2, "weightDecay": 0.0},
        "schedule": {"warmupSteps": 1, "decay": "constant"},
        "budget": {"steps": steps},
        "training": {"microBatchSize": 4},
        # evaluated steps (every 2) are checkpoints with placement separate, saved or not
        "checkpoint": {"every": 4 if placement == "separate" else 2, "keep": 10},
        "evaluation": {"every": 2, "placement": placement, "suites": [
            {"name": "legal", "kind": "domain", "uri": str(files["legal_eval"]), "maxSamples": 4},
            {"name": "general", "kind": "general", "uri": str(files["code_eval"]), "maxSamples": 8},
        ]},
        "gates": [{"name": "forgetting", "suite": "general", "baseline": "base", "threshold": 0.25,
                   "relative": True, "action": "rollback", "rollbackTo": "lastGood",
                   "tune": {"lrFactor": 0.02, "replayDelta": 0.3}}] if gated else [],
        "stopPolicy": {"maxRollbacks": 3},
    }


def _run(tmp: Path, name: str, spec: dict[str, Any]) -> tuple[subprocess.CompletedProcess[str], Path]:
    file = tmp / f"{name}.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": name}, "spec": spec}))
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                           "--no-progress"], cwd=tmp, capture_output=True, text=True, timeout=900)
    return done, tmp / "runs" / name


def _events(run_dir: Path, attempt: int) -> list[dict[str, Any]]:
    path = run_dir / f"attempt-{attempt:03d}" / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_separate_processes_evaluate_every_checkpoint_and_a_late_breach_rolls_back(tmp_path, tiny_model_dir,
                                                                                     corpora):
    base = pretrain_on_code(tiny_model_dir, tmp_path / "base")
    files = forgetting_files(tmp_path, sorted(Path(corpora["domain"]).glob("*.txt")))
    spec = _spec(base, corpora, files, placement="separate", steps=8, gated=True)
    spec["evaluation"]["concurrency"] = 2  # two evaluations beside the trainer
    done, run_dir = _run(tmp_path, "apart", spec)
    status = json.loads((run_dir / "status.json").read_text())
    log = done.stdout + done.stderr
    assert done.returncode == 0 and status["phase"] == "Succeeded", log
    assert status["rollbacks"] >= 1, log
    record = status["history"][0]
    assert record["gate"] == "forgetting" and record["value"] > record["baseline"] * 1.25

    # the trainers measured nothing themselves; every evaluated step is a checkpoint
    attempts = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("attempt-*"))
    for attempt in attempts:
        assert not [e for e in _events(run_dir, attempt) if e["event"] == "evaluated"]
    refs, _ = list_checkpoints(str(run_dir / "checkpoints"))
    assert all(r.manifest.step % 2 == 0 for r in refs)
    # ... and a process of its own evaluated each one, and the base, once
    root = run_dir / "checkpoints"
    for r in refs:
        written = json.loads((root / f"attempt-{r.attempt:03d}" / eval_record_name(r.manifest.step)).read_text())
        assert written["checkpoint"] == r.name.split("/")[1] and set(written["metrics"]) == {
            "legal.perplexity", "general.perplexity"}
        assert (run_dir / f"attempt-{r.attempt:03d}" / f"evaluate-{r.name.split('/')[1]}" / "evaluate.log").exists()
    assert (run_dir / "attempt-001" / "evaluate-base" / "evaluate.log").exists()
    assert "evaluated base:" in done.stdout and "evaluated step 2:" in done.stdout  # the runner shows them
    assert status["baseMetrics"] and set(status["baseMetrics"]) == {"legal.perplexity", "general.perplexity"}

    evaluated = next(c for c in status["conditions"] if c["type"] == "Evaluated")
    assert evaluated["status"] == "True", evaluated
    assert {c["name"] for c in status["checkpoints"]} == {r.name for r in refs}
    assert all(c["metrics"] for c in status["checkpoints"])
    chosen = next(c for c in status["checkpoints"] if c["name"] == status["bestCheckpoint"]) \
        if status["bestCheckpoint"] != "base" else None
    assert chosen is None or chosen["passedGates"]
    if record["target"] != "base":
        good = next(c for c in status["checkpoints"] if c["name"] == record["target"])
        assert good["passedGates"]


def test_a_separate_evaluation_measures_what_the_trainer_measured_inline(tmp_path, tiny_model_dir, corpora):
    files = forgetting_files(tmp_path, sorted(Path(corpora["domain"]).glob("*.txt")))
    spec = _spec(tiny_model_dir, corpora, files, placement="inline", steps=2, gated=False)
    spec["evaluation"]["early"] = {"every": 1, "steps": 1}  # step 1 too, with no checkpoint there
    done, run_dir = _run(tmp_path, "inline", spec)
    assert done.returncode == 0, done.stdout + done.stderr
    inline_root = run_dir / "checkpoints" / "attempt-001"
    assert (inline_root / eval_record_name(1)).exists() and not (inline_root / "step-00000001").exists()
    inline = json.loads((inline_root / eval_record_name(2)).read_text())
    inline_base = json.loads((inline_root / eval_record_name(0)).read_text())

    # the same checkpoint in another root, evaluated there by the separate evaluator
    other = tmp_path / "other" / "attempt-001"
    shutil.copytree(inline_root / "step-00000002", other / "step-00000002")
    config = json.loads((run_dir / "attempt-001" / "trainer-config.json").read_text())
    config.update(checkpointRoot=str(other.parent), checkpointUri=str(other), runDir=str(tmp_path / "eval-run"))
    (tmp_path / "eval.json").write_text(json.dumps(config))
    for target in ("step-00000002", "base"):
        ran = subprocess.run([sys.executable, "-m", "cpt_trainer", "--config", str(tmp_path / "eval.json"),
                              "--evaluate", target], capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stdout + ran.stderr
    separate = json.loads((other / eval_record_name(2)).read_text())
    separate_base = json.loads((other / eval_record_name(0)).read_text())
    assert separate["checkpoint"] == "step-00000002" and separate["tokens"] == inline["tokens"]
    assert separate_base["isBase"]
    for got, want in ((separate, inline), (separate_base, inline_base)):
        assert set(got["metrics"]) == set(want["metrics"])
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-5), key

    # a second evaluation of the same checkpoint changes nothing: the record is written once
    before = (other / eval_record_name(2)).read_bytes()
    again = subprocess.run([sys.executable, "-m", "cpt_trainer", "--config", str(tmp_path / "eval.json"),
                            "--evaluate", "step-00000002"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (other / eval_record_name(2)).read_bytes() == before

    # as an evaluation Job runs it on a pod of several GPUs: 2 fsdp ranks, each loading its shard of
    # the checkpoint and scoring its share of each suite, under a short collective timeout
    ranks = tmp_path / "ranks" / "attempt-001"
    shutil.copytree(inline_root / "step-00000002", ranks / "step-00000002")
    config["spec"]["training"]["parallelism"] = {"strategy": "fsdp", "collectiveTimeoutSeconds": 20}
    config.update(checkpointRoot=str(ranks.parent), checkpointUri=str(ranks), runDir=str(tmp_path / "ranks-run"))
    (tmp_path / "ranks.json").write_text(json.dumps(config))
    ran = subprocess.run([sys.executable, "-m", "cpt_trainer.launch", "--standalone", "--nproc-per-node=2",
                          "-m", "cpt_trainer", "--config", str(tmp_path / "ranks.json"), "--evaluate", "step-00000002"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    sharded = json.loads((ranks / eval_record_name(2)).read_text())
    for key, value in inline["metrics"].items():
        assert sharded["metrics"][key] == pytest.approx(value, rel=1e-5), key
    # again on 2 ranks: rank 0 finds the record and every rank ends without loading anything
    written = (ranks / eval_record_name(2)).read_bytes()
    again = subprocess.run(ran.args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is evaluated already" in again.stdout + again.stderr
    assert (ranks / eval_record_name(2)).read_bytes() == written
