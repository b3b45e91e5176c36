"""A poisoned source end to end through `cptctl run`: the run blames the source, skips its bad
windows, restarts from the stable checkpoint before the spike and keeps its LR.

The base is a tiny Llama taught some Python, so its loss on text is low and steady; the domain
source turns into random CJK characters (bytes the model never saw) in two stretches of
documents. Every token of them is a surprise: the grad norm and the legal loss spike.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt_api.events import parse_event
from tests.conftest import _license_texts
from tests.integration.harness import jsonl, pretrain_on_code, python_files

pytestmark = pytest.mark.slow


def poisoned_legal(path: Path) -> Path:
    rng = random.Random(0)
    paras = [p.strip() for t in _license_texts() for p in t.split("\n\n") if len(p.strip()) > 200]
    junk = ["".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(150)) for _ in range(4)]
    return jsonl(path, paras[:8] + junk[:2] + paras[8:20] + junk[2:] + paras[20:200])


def events_of(run_dir: Path, attempt: int) -> list:
    lines = (run_dir / f"attempt-{attempt:03d}" / "events.jsonl").read_text().splitlines()
    return [parse_event(line) for line in lines if line.strip()]


def test_junk_windows_are_blamed_skipped_and_the_lr_is_kept(tmp_path, tiny_model_dir):
    base = pretrain_on_code(tiny_model_dir, tmp_path / "base")
    code = jsonl(tmp_path / "code.jsonl", [p.read_text() for p in python_files()[:60]])
    spec = {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": str(poisoned_legal(tmp_path / "legal.jsonl")),
             "format": "jsonl", "weight": 0.8},
            {"name": "code", "role": "replay", "uri": str(code), "format": "jsonl", "weight": 0.2},
        ], "curation": {"decontaminate": False, "dedupe": "none", "maxNonPrintable": 1.0,
                        "maxRepeatedLineRatio": 1.0}},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmupSteps": 2, "decay": "constant"},
        "gradient": {"anomaly": {"window": 5, "maxConsecutive": 2}},
        "budget": {"steps": 30},
        "training": {"microBatchSize": 4},
        "checkpoint": {"every": 3, "keep": 20},
        "stopPolicy": {"maxRollbacks": 2},
    }
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": "poisoned"}, "spec": spec}))
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    run_dir = tmp_path / "runs" / "poisoned"
    status = json.loads((run_dir / "status.json").read_text())
    assert done.returncode == 0 and status["phase"] == "Succeeded", done.stdout + done.stderr

    # Attempt 1: every anomaly of the junk is blamed on legal; each stretch is one restore,
    # the first widened while the junk lasted.
    first = [e for e in events_of(run_dir, 1) if e.event == "anomaly"]
    assert {e.source for e in first if e.kind in ("grad_norm", "loss_spike")} == {"legal"}
    restores = [e for e in first if e.kind == "restored"]
    assert len(restores) == 2 and all(e.skip.source == "legal" for e in restores)
    assert any(e.kind == "skipped" for e in first), [e.kind for e in first]

    # The rollback: to the stable checkpoint before the first spike, not the base; the windows
    # skipped from then on; the LR untouched.
    (record,) = status["history"]
    spike = restores[0].skip.step
    assert record["gate"] == "anomaly-restores" and "legal" in record["reason"]
    assert record["target"].startswith("attempt-001/") and record["target"] != "base"
    assert int(record["target"].rsplit("-", 1)[1]) < spike
    assert status["overrides"]["lrScale"] == 1.0
    assert {s["source"] for s in status["overrides"]["skips"]} == {"legal"}
    second = json.loads((run_dir / "attempt-002" / "trainer-config.json").read_text())
    assert second["restoreFrom"].endswith(record["target"]) and second["overrides"]["lrScale"] == 1.0
    assert len(second["overrides"]["skips"]) == 2

    # Attempt 2 replays from before the spike and drops the junk it was told about; the rest of
    # the second stretch, which attempt 1 never reached, widens that window without a restore.
    assert status["rollbacks"] == 1 and status["attempt"] == 2
    again = [e for e in events_of(run_dir, 2) if e.event == "anomaly"]
    assert not [e for e in again if e.kind == "restored"], [(e.kind, e.message) for e in again]
    final = sorted((run_dir / "checkpoints" / "attempt-002").glob("step-*"))[-1]
    data = json.loads((final / "data-rank00000.json").read_text())
    skipped = sum(s["end"] - s["start"] for s in second["overrides"]["skips"])
    assert data["skipped"] == {"legal": skipped, "code": 0}
    lineage = json.loads((final / "manifest.json").read_text())["lineage"]
    assert {s["start"] for s in lineage["skips"]} >= {s["start"] for s in second["overrides"]["skips"]}
