"""A run that makes the domain worse ends without handing out a checkpoint, through `cptctl run`.

The base is the tiny random Llama; the learning rate (1.0, constant) is far too high, so the
first evaluation finds the domain perplexity above the base's. `stopPolicy.noImprovement` ends
the run there instead of spending the budget, the base is the choice, and every place a user
looks says so: the exit and the summary of `cptctl run`, `status.json` (bestCheckpoint and the
Improved condition), `cptctl status`, `cptctl checkpoints` and `cptctl export`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import write_benchmark_tasks
from tests.integration.harness import tiny_spec, with_repo_path

pytestmark = pytest.mark.slow


def cptctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cpt_operator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=with_repo_path())


def test_a_run_that_makes_the_domain_worse_chooses_the_base_and_stops_early(
        tmp_path: Path, tiny_model_dir: Path, corpora: dict[str, Path]) -> None:
    domain_eval = tmp_path / "legal-eval.jsonl"
    domain_eval.write_text("".join(json.dumps({"text": p.read_text()[:2000]}) + "\n"
                                   for p in sorted(corpora["domain"].glob("*.txt"))[:4]))
    spec: dict[str, Any] = tiny_spec(
        tiny_model_dir, corpora,
        optimizer={"lr": 1.0, "weightDecay": 0.0},
        schedule={"warmupSteps": 0, "decay": "constant"},
        budget={"steps": 40},
        checkpoint={"every": 3, "keep": 10},
        evaluation={"every": 3, "suites": [
            {"name": "legal", "kind": "domain", "uri": str(domain_eval), "maxSamples": 4},
            # a benchmark (lm-eval tasks written here) rides along like any suite
            {"name": "sums", "kind": "general", "metric": "acc", "uri": str(write_benchmark_tasks(tmp_path / "tasks")),
             "benchmark": {"tasks": ["sums"], "numFewshot": 0}}]},
        stopPolicy={"noImprovement": {"evals": 1}})
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": "worse"}, "spec": spec}))
    done = cptctl("run", str(file), "--nproc", "1", "--no-progress", cwd=tmp_path)
    out = done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "worse"
    status = json.loads((run_dir / "status.json").read_text())

    # it did what was asked: no error, Succeeded, long before the 40-step budget
    assert done.returncode == 0 and status["phase"] == "Succeeded", out
    assert status["step"] < 40 and "no improvement: the domain gained at most" in status["message"], out
    assert {"sums.acc", "sums.acc_stderr"} <= set(status["baseMetrics"]) and all(
        {"sums.acc", "sums.acc_stderr"} <= set(c["metrics"]) for c in status["checkpoints"])
    base_ppl = status["baseMetrics"]["legal.perplexity"]
    assert all(c["metrics"]["legal.perplexity"] > base_ppl for c in status["checkpoints"]), status["checkpoints"]
    # ... and no checkpoint is called chosen
    assert status["bestCheckpoint"] == "base", out
    improved = next(c for c in status["conditions"] if c["type"] == "Improved")
    assert (improved["status"], improved["reason"]) == ("False", "NoImprovement")
    assert "held back by the domain, which did not improve" in improved["message"]
    assert "per token" in improved["message"]
    assert "no improvement: no checkpoint is better than the base" in done.stdout

    # each checkpoint's lineage names the evaluation it was measured on and the code that wrote it
    from cpt_api.spec import CptRunSpec
    from cpt_trainer import __version__
    from cpt_trainer.evals.data import load_samples, suite_digest

    legal = CptRunSpec.model_validate(spec).suites_by_name()["legal"]
    manifest = next((run_dir / "checkpoints").glob("attempt-001/step-*/manifest.json"))
    lineage = json.loads(manifest.read_text())["lineage"]
    assert lineage["evalDigests"]["legal"] == suite_digest(legal, load_samples(legal))
    assert sorted(lineage["evalDigests"]) == ["legal", "sums"]
    assert lineage["codeVersion"] == f"cpt-trainer {__version__}"

    shown = cptctl("status", str(run_dir), cwd=tmp_path)
    assert "chosen base (no checkpoint is better than the base)" in shown.stdout, shown.stdout + shown.stderr
    table = cptctl("checkpoints", str(run_dir), cwd=tmp_path)
    assert "chosen: the base." in table.stdout, table.stdout + table.stderr
    assert next(line for line in table.stdout.splitlines() if " base " in f" {line} ").split()[0] == "*"
    export = cptctl("export", str(run_dir), "--to", str(tmp_path / "exported"), cwd=tmp_path)
    assert export.returncode != 0 and "none is better than the base" in export.stderr, export.stdout + export.stderr
    assert not (tmp_path / "exported").exists()
