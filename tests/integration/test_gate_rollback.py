"""A regression gate end to end through `cptctl run`: forgetting is detected, the run rolls back
to the last good checkpoint with a lower LR and more replay, and still ends with a choice.

The base is a tiny Llama first taught Python source (its "general" ability); the CPT run then
trains it on license text with a far too high LR, the classic way to make it forget.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt_api.store import list_checkpoints
from tests.integration.harness import forgetting_files, pretrain_on_code

pytestmark = pytest.mark.slow


def test_gate_breach_rolls_back_with_adjusted_settings_and_loses_nothing(tmp_path, tiny_model_dir, corpora):
    base = pretrain_on_code(tiny_model_dir, tmp_path / "base")
    files = forgetting_files(tmp_path, sorted(Path(corpora["domain"]).glob("*.txt")))
    code_train, code_eval, legal_eval = files["code_train"], files["code_eval"], files["legal_eval"]
    spec = {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.9},
            {"name": "code", "role": "replay", "uri": str(code_train), "format": "jsonl", "weight": 0.1},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-2, "weightDecay": 0.0},
        "schedule": {"warmupSteps": 1, "decay": "constant"},
        "budget": {"steps": 12},
        "training": {"microBatchSize": 4},
        "checkpoint": {"every": 2, "keep": 10},
        "evaluation": {"every": 2, "suites": [
            {"name": "legal", "kind": "domain", "uri": str(legal_eval), "maxSamples": 4},
            {"name": "general", "kind": "general", "uri": str(code_eval), "maxSamples": 8},
        ]},
        "gates": [{"name": "forgetting", "suite": "general", "baseline": "base", "threshold": 0.25,
                   "relative": True, "action": "rollback", "rollbackTo": "lastGood",
                   "tune": {"lrFactor": 0.02, "replayDelta": 0.3}}],
        "stopPolicy": {"maxRollbacks": 3},
    }
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": "gated"}, "spec": spec}))
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    run_dir = tmp_path / "runs" / "gated"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["rollbacks"] >= 1, done.stdout + done.stderr
    assert done.returncode == 0 and status["phase"] == "Succeeded", done.stdout + done.stderr

    record = status["history"][0]
    assert record["gate"] == "forgetting" and record["value"] > record["baseline"] * 1.25
    second = json.loads((run_dir / "attempt-002" / "trainer-config.json").read_text())
    assert second["overrides"]["lrScale"] == pytest.approx(0.02)
    assert second["overrides"]["replayDelta"] == pytest.approx(0.3)
    if record["target"] == "base":
        assert "restoreFrom" not in second and second["overrides"].get("rewarmFrom") is None
    else:
        assert second["restoreFrom"].endswith(record["target"])
        assert second["restoreMode"] == "fullState"
        good = next(c for c in status["checkpoints"] if c["name"] == record["target"])
        assert good["passedGates"]
        # the LR warms up again from the restored step instead of resuming at full strength
        start = int(record["target"].rsplit("-", 1)[1])
        assert second["overrides"]["rewarmFrom"] == start
        events = [json.loads(line) for line in (run_dir / "attempt-002" / "events.jsonl").read_text().splitlines()]
        lrs = [e["lr"] for e in events if e["event"] == "progress"][:3]
        peak = 3e-2 * 0.02  # the constant schedule's LR, tuned by the gate
        assert lrs == pytest.approx([peak * (i + 1) / 10 for i in range(3)])
    assert any(c["type"] == "RolledBack" for c in status["conditions"]) or record["target"]

    # Nothing is lost: every committed checkpoint, on both sides of the rollback, still verifies.
    # The abandoned attempt is killed, maybe while a save is in flight in the background: that
    # directory never got a manifest, so it never was a checkpoint, and listing reports it.
    refs, problems = list_checkpoints(str(run_dir / "checkpoints"))
    assert all(p.checkpoint.startswith("attempt-001/") and "no manifest" in p.reason
               for p in problems), problems
    assert {r.attempt for r in refs} >= {1, 2}
    assert status["bestCheckpoint"] in status["frontier"]
    chosen = next(c for c in status["checkpoints"] if c["name"] == status["bestCheckpoint"])
    assert chosen["passedGates"]
    shown = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "checkpoints", str(run_dir)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and status["bestCheckpoint"] in shown.stdout
