"""KL-to-base and a gate that rolls back, on 1, 2 and 4 fsdp ranks, through `cptctl run --nproc N`
(the local control plane over `torchrun -m cpt_trainer`, gloo).

The base is a tiny Llama first taught Python source (its "general" ability); the run trains it
on license text at a far too high LR, with `refKL.beta: 0.1`, a behaviour, a safety and a drift
suite beside the gated general suite. A low replay weight, one window per micro-batch and short
windows leave most micro-batches of most ranks without a replay token, so a rank that ran the
sharded reference only where it had replay tokens would wait in the reference's all-gather while
another waits in the backward's reduce-scatter; the 30 s collective timeout turns such a hang
into a failed run.

What must be equal. Every rank reads its own share of the data, so other world sizes train on
other batches and measure other values; what the control plane decides must not differ: the
general gate breaches in attempt 1, the run rolls back once, to the base, with the gate's tuned LR
and replay, and the tuned attempt ends Succeeded with the same checkpoint chosen (the step at
which a breach is acted on depends on how fast the runner reads the evaluations, so it is not
compared). The base's evaluation, on the same weights everywhere, agrees (perplexity rel 1e-5,
rates exactly, kl_to_base within 1e-6). The KL term's value under fsdp and ddp on 2 and 4 ranks
against one process: tests/integration/test_eval_ranks.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import forgetting_files, pretrain_on_code, with_repo_path

pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_WINDOWS = 4
"""Windows per optimizer step on every world size (one per micro-batch)."""
WORLDS = (1, 2, 4)
PROMPTS = ["Permission is hereby granted", "def main(", "THE SOFTWARE IS PROVIDED",
           "Return a JSON object:", "This program is free software"]


def suites(root: Path) -> list[dict[str, Any]]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"text": p, **({"response": " See the license."} if i % 2 else {})})
                            + "\n" for i, p in enumerate(PROMPTS)))
    generation = {"uri": str(prompts), "maxNewTokens": 7}
    return [
        {"name": "json", "kind": "behavior", "metric": "json_valid", **generation},
        {"name": "safety", "kind": "safety", "metric": "refusal_rate", **generation,
         "refusalClassifier": "tests.integration.harness:odd_length"},
        {"name": "chat", "kind": "drift", "uri": str(chat), "metric": "kl_to_base", "maxNewTokens": 6},
    ]


def run_spec(base: Path, corpora: dict[str, Path], files: dict[str, Path], root: Path, world: int) -> dict[str, Any]:
    general = {"name": "general", "kind": "general", "uri": str(files["code_eval"]), "maxSamples": 8}
    return {
        "baseModel": {"uri": str(base), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.85},
            {"name": "code", "role": "replay", "uri": str(files["code_train"]), "format": "jsonl",
             "weight": 0.15},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": 32, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-2, "weightDecay": 0.0},
        "schedule": {"warmupSteps": 1, "decay": "constant"},
        "budget": {"steps": STEPS},
        "regularization": {"refKL": {"beta": 0.1}},
        "training": {"microBatchSize": 1, "gradAccumulation": GLOBAL_WINDOWS // world,
                     "parallelism": {"strategy": "fsdp", "collectiveTimeoutSeconds": 30}},
        "checkpoint": {"every": 2, "keep": 10},
        "evaluation": {"every": 2, "suites": [general, *suites(root)]},
        "gates": [{"name": "forgetting", "suite": "general", "baseline": "base", "threshold": 0.25,
                   "relative": True, "action": "rollback", "rollbackTo": "lastGood",
                   "tune": {"lrFactor": 0.02, "replayDelta": 0.3}}],
        "stopPolicy": {"maxRollbacks": 2},
    }


def cptctl_run(root: Path, spec: dict[str, Any], world: int) -> Path:
    file = root / "run.yaml"
    file.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": "gated"}, "spec": spec}))
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", str(world),
                           "--no-progress"], cwd=root, capture_output=True, text=True, timeout=600,
                          env=with_repo_path())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "runs" / "gated"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, corpora) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ref-kl-ranks")
    base = pretrain_on_code(tiny_model_dir, tmp / "base")
    files = forgetting_files(tmp, sorted(Path(corpora["domain"]).glob("*.txt")))
    out = {}
    for world in WORLDS:
        root = tmp / f"fsdp-{world}"
        root.mkdir()
        out[f"fsdp-{world}"] = cptctl_run(root, run_spec(base, corpora, files, root, world), world)
    return out


def status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "status.json").read_text())  # type: ignore[no-any-return]


def events(run_dir: Path, attempt: int, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / f"attempt-{attempt:03d}" / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def decisions(state: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What the control plane decided, without the values it measured."""
    return [(h["gate"], h["attempt"], h["metric"], h["target"], json.dumps(h["overrides"], sort_keys=True))
            for h in state["history"]]


def base_evaluation(run_dir: Path) -> dict[str, float]:
    (base,) = [e for e in events(run_dir, 1, "evaluated") if e.get("isBase")]
    return dict(base["metrics"])


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key.endswith("kl_to_base"):
            assert got[key] == pytest.approx(value, abs=1e-6), (key, got, want)
        elif key.endswith("perplexity"):
            assert got[key] == pytest.approx(value, rel=rel), (key, got, want)
        else:
            assert got[key] == value, (key, got, want)


@pytest.mark.parametrize("name", ["fsdp-2", "fsdp-4"])
def test_every_world_size_decides_and_measures_the_base_as_one_process(runs, name):
    alone, other = status(runs["fsdp-1"]), status(runs[name])
    assert (alone["phase"], alone["rollbacks"]) == ("Succeeded", 1), alone["history"]
    assert decisions(alone)[0][:4] == ("forgetting", 1, "general.perplexity", "base")
    assert (other["phase"], other["rollbacks"], decisions(other)) == ("Succeeded", 1, decisions(alone))
    assert other["bestCheckpoint"] == alone["bestCheckpoint"]
    chosen = next(c for c in other["checkpoints"] if c["name"] == other["bestCheckpoint"])
    assert chosen["passedGates"] and chosen["name"].startswith("attempt-002/")
    assert_close(base_evaluation(runs[name]), base_evaluation(runs["fsdp-1"]))
