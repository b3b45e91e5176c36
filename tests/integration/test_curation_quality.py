"""Quality rules through `cptctl run`: a source that is mostly random symbols is dropped by
datatrove's Gopher rules, and the run is refused with the source and the rules named in its
status, on one rank and on two (the dropped shares are summed over ranks, so both refuse at the
same step and neither waits for the other)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.harness import tiny_spec
from tests.integration.test_local_run import cptctl, status, write_run
from tests.unit.data.test_quality import PROSE, junk

pytestmark = pytest.mark.slow


def web_source(tmp: Path) -> Path:
    """38 documents of random symbols and 2 of prose."""
    docs = [PROSE + f" It was written in {1990 + i}." if i % 20 == 0 else junk(i) for i in range(40)]
    path = tmp / "web.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_source_mostly_dropped_by_its_quality_rules_refuses_the_run_naming_it(
        tmp_path, tiny_model_dir, corpora, nproc):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 40})
    spec["data"]["sources"].append({"name": "web", "role": "replay", "uri": str(web_source(tmp_path)),
                                    "format": "jsonl", "weight": 0.5, "quality": {}})
    done = cptctl("run", str(write_run(tmp_path, spec, "junk")), "--nproc", str(nproc), "--no-progress",
                  cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text

    run_dir = tmp_path / "runs" / "junk"
    shown = status(run_dir)
    assert shown["phase"] == "Failed", shown
    message = " ".join(c["message"] for c in shown["conditions"])
    assert "source 'web': curation dropped 95% of 40 documents" in message, message
    assert "gopher_below_avg_threshold" in message and "maxDroppedShare 90%" in message, message
    assert "restart" not in text  # refused, not retried: the same data would fail the same way
    # each rank's curation report names the rule and the documents it dropped, per source
    reports = [json.loads(p.read_text()) for p in run_dir.rglob("curation*.json")]
    assert len(reports) == nproc
    assert {s for r in reports for s in r["droppedBySource"]} == {"web"}
    assert sum(r["droppedBySource"].get("web", {}).get("gopher_below_avg_threshold", 0) for r in reports) == 38
    examples = [e for r in reports for e in r["filters"].get("gopher_below_avg_threshold", {}).get("examples", [])]
    assert examples and all(e["source"] == "web" and e["file"].endswith("web.jsonl") for e in examples)
