"""KL-to-base on 1, 2 and 4 fsdp ranks through the real trainer (`torchrun -m cpt_trainer`, gloo).

A low replay weight, one window per micro-batch and short windows leave most micro-batches of
most ranks without a replay token, so a rank that ran the sharded reference only where it had
replay tokens would wait in the reference's all-gather while another waits in the backward's
reduce-scatter; the 30 s collective timeout turns such a hang into a failed run.

What must be equal. Every rank reads its own share of the data, so other world sizes train on
other batches: the base evaluation (before the first step) must agree across 1, 2 and 4 ranks
(perplexity rel 1e-5, rates exactly, kl_to_base within abs 1e-6), and on the same 2 ranks fsdp
(the reference sharded, entered on every micro-batch) must train the losses of ddp (a replicated
reference, run only where there is replay) within rel 1e-5, and evaluate the same (perplexity
within rel 1e-4 once trained: the two strategies' weights differ by fp32 rounding).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import events, log_tail, of, run, tiny_spec, write_config

pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_WINDOWS = 4
"""Windows per optimizer step on every world size (one per micro-batch)."""
PROMPTS = ["Permission is hereby granted", "def main(", "THE SOFTWARE IS PROVIDED",
           "Return a JSON object:", "This program is free software"]

HELD_OUT = ["The licensee may copy the work for any purpose, provided that this notice is kept.",
            "for name in sorted(paths):\n    print(name, len(name))\n",
            "No part of this document may be reproduced without the written consent of the owner."]


def evaluation(root: Path) -> dict[str, Any]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"text": p, **({"response": " See the license."} if i % 2 else {})})
                            + "\n" for i, p in enumerate(PROMPTS)))
    held_out = root / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    generation = {"uri": str(prompts), "maxNewTokens": 7}
    return {"every": 2, "suites": [
        {"name": "held-out", "kind": "domain", "uri": str(held_out), "metric": "perplexity"},
        {"name": "json", "kind": "behavior", "metric": "json_valid", **generation},
        {"name": "safety", "kind": "safety", "metric": "refusal_rate", **generation,
         "refusalClassifier": "tests.integration.harness:odd_length"},
        {"name": "chat", "kind": "drift", "uri": str(chat), "metric": "kl_to_base", "maxNewTokens": 6},
    ]}


def spec(model: Path, corpora: dict[str, Path], root: Path, world: int, strategy: str) -> dict[str, Any]:
    return tiny_spec(
        model, corpora, budget={"steps": STEPS}, checkpoint={"every": STEPS, "keep": 2},
        data={"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.85},
            {"name": "code", "role": "replay", "uri": f"{corpora['replay']}/*.jsonl",
             "format": "jsonl", "weight": 0.15}]},
        packing={"seqLen": 32, "boundary": "documentMask"},
        regularization={"refKL": {"beta": 0.1}},
        evaluation=evaluation(root),
        training={"microBatchSize": 1, "gradAccumulation": GLOBAL_WINDOWS // world,
                  "parallelism": {"strategy": strategy, "collectiveTimeoutSeconds": 30}})


def train(tmp: Path, model: Path, corpora: dict[str, Path], world: int, strategy: str) -> list[Any]:
    root = tmp / f"{strategy}-{world}"
    root.mkdir()
    config = write_config(root, spec(model, corpora, root, world, strategy))
    assert run(config, nproc=world, timeout=240) == 0, log_tail(config)
    evs = events(config)
    assert of("finished", evs)[-1].reason == "budget", log_tail(config)
    return evs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, corpora) -> dict[str, list[Any]]:
    tmp = tmp_path_factory.mktemp("ref-kl")
    return {f"{strategy}-{world}": train(tmp, tiny_model_dir, corpora, world, strategy)
            for world, strategy in [(1, "fsdp"), (2, "fsdp"), (4, "fsdp"), (2, "ddp")]}


def evaluations(evs: list[Any]) -> dict[int, dict[str, float]]:
    return {e.step: e.metrics for e in of("evaluated", evs)}


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key.endswith("kl_to_base"):
            assert got[key] == pytest.approx(value, abs=1e-6), (key, got, want)
        elif key.endswith("perplexity"):
            assert got[key] == pytest.approx(value, rel=rel), (key, got, want)
        else:
            assert got[key] == value, (key, got, want)


@pytest.mark.parametrize("name", ["fsdp-2", "fsdp-4", "ddp-2"])
def test_every_world_size_finishes_and_measures_the_base_as_one_process(runs, name):
    alone, evs = evaluations(runs["fsdp-1"]), evaluations(runs[name])
    assert sorted(evs) == sorted(alone) == [0, 2, 4]
    assert 0 < alone[0]["safety.refusal_rate"] < 1  # verdicts that differ from sample to sample
    assert_close(evs[0], alone[0])


def test_a_sharded_reference_trains_and_evaluates_as_a_replicated_one(runs):
    sharded, replicated = runs["fsdp-2"], runs["ddp-2"]
    losses = {e.step: e.loss for e in of("progress", sharded)}
    want = {e.step: e.loss for e in of("progress", replicated)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, losses, want)
    for step, metrics in evaluations(replicated).items():
        assert_close(evaluations(sharded)[step], metrics, rel=1e-4)
