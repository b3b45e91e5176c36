"""The evaluator on 2 and 4 gloo ranks (`eval_ranks_check.py` under torchrun), FSDP2-sharded and
as DDP replicas, against one process evaluating everything.

Nine samples per suite on 2 or 4 ranks: shares differ in size, and with a small logit budget
the larger shares need more batches, so under fsdp the smaller ones run padding batches. A stop
token chosen from the model's own outputs ends some generations after a few tokens while others
run to maxNewTokens, so ranks finish their generations at different steps. A rank that took
another code path would wait in a collective for the 20 s timeout and fail the run.

Tolerances against one process: perplexity, NLL and new-terms perplexity within rel 1e-5 (a
window's logits round a little differently in another batch), kl_to_base within abs 1e-6, rates,
benchmark accuracies and generated texts exactly; every rank of a run holds exactly the same
results.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_api.spec import Sharding
from cpt_trainer.distributed import Dist
from cpt_trainer.evals.generation import decode, greedy, prompt_rows

from tests.conftest import write_benchmark_tasks
from tests.integration import eval_ranks_check as check
from tests.integration.harness import with_repo_path

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
MAX_NEW = 10
PROMPTS = ["Permission is hereby granted", "def main(", "THE SOFTWARE IS PROVIDED",
           "Return a JSON object:", "This program is free software", "import os\n",
           "You may not use this file except", "class Config:", "Copyright (C)"]


def stop_token(outputs: list[list[int]]) -> int:
    """A token some outputs produce before their last step and others never: with it as a stop,
    some generations end early and others run to MAX_NEW tokens."""
    early = Counter(t for out in outputs for t in set(out[:MAX_NEW - 1]))
    return max(early, key=lambda t: (min(early[t], len(outputs) - early[t]), -t))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def suites(root: Path, texts: list[str], outputs: list[str]) -> list[dict[str, Any]]:
    """Nine samples each: held-out text, behaviour and safety prompts, a drift suite with and
    without given responses. The format pattern of every other sample is its own output's
    start, so the rate checks that verdicts stay with their samples."""
    text = write_jsonl(root / "held-out.jsonl", [{"text": t} for t in texts])
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"text": p, "pattern": re.escape(o.lstrip()[:3]) if i % 2 == 0 else r"\{NEVER"}
        for i, (p, o) in enumerate(zip(PROMPTS, outputs))])
    chat = write_jsonl(root / "chat.jsonl", [
        {"text": p, **({"response": " See the license."} if i % 3 == 0 else {})}
        for i, p in enumerate(PROMPTS)])
    generation = {"uri": prompts, "maxNewTokens": MAX_NEW}
    # Programs whose completion lands inside a raw string the test closes: whatever the model
    # writes, the programs of even samples pass and those of odd samples fail their check
    programs = write_jsonl(root / "programs.jsonl", [
        {"prompt": f'def answer():\n    return {i}\n\nNOTE = r"""\nThe answer is', "entry_point": "answer",
         "test": f'"""\n\ndef check(candidate):\n    assert candidate() == {i if i % 2 == 0 else -1}\n'}
        for i in range(len(PROMPTS))])
    return [
        {"name": "held-out", "kind": "domain", "uri": text, "metric": "perplexity"},
        {"name": "held-out-nll", "kind": "general", "uri": text, "metric": "nll"},
        {"name": "held-out-bpb", "kind": "domain", "uri": text, "metric": "bits_per_byte"},
        {"name": "json", "kind": "behavior", "metric": "json_valid", **generation},
        {"name": "format", "kind": "behavior", "metric": "format_follow", **generation},
        {"name": "safety", "kind": "safety", "metric": "refusal_rate", **generation,
         "refusalClassifier": "tests.integration.harness:odd_length"},
        {"name": "chat", "kind": "drift", "uri": chat, "metric": "kl_to_base", "maxNewTokens": MAX_NEW},
        # each rank runs its share's programs in the sandbox
        {"name": "programs", "kind": "general", "uri": programs, "metric": "pass_at_1", "maxNewTokens": MAX_NEW,
         "code": {"timeoutSeconds": 20, "memory": "512Mi"}},
        # pass@2 from 3 sampled completions a program: one generate call a prompt, in lock step
        {"name": "sampled", "kind": "general", "uri": programs, "metric": "pass_at_k", "maxNewTokens": MAX_NEW,
         "code": {"timeoutSeconds": 20, "memory": "512Mi", "samples": 3, "k": 2}},
        # lm-eval tasks: every rank runs them whole, in lock step (a collective under fsdp)
        {"name": "sums", "kind": "general", "metric": "acc", "uri": str(write_benchmark_tasks(root / "tasks")),
         "benchmark": {"tasks": ["sums"], "numFewshot": 0, "limit": 9, "batchSize": 4}},
        {"name": "echo", "kind": "behavior", "metric": "exact_match", "uri": str(root / "tasks"),
         "benchmark": {"tasks": ["echo"], "numFewshot": 0, "limit": 3}},
    ]


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_model_dir, corpora) -> Path:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("eval-ranks")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = check.load(str(tiny_model_dir), [tokenizer.eos_token_id], perturb=True).eval()
    rows = prompt_rows(tokenizer, PROMPTS, seq_len=64, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        raw = greedy(model, tokenizer, rows, max_new_tokens=MAX_NEW, device=CPU, seq_len=64)
    stop = stop_token(raw)
    ended = [out.index(stop) + 1 if stop in out else len(out) for out in raw]
    assert min(ended) < MAX_NEW == max(ended), ended  # outputs of different lengths
    outputs = [decode(tokenizer, out[:n]) for out, n in zip(raw, ended)]
    # Held-out texts of 1 to about 5 windows of 64 tokens.
    texts = [p.read_text()[:150 * (1 + i % 7)] for i, p in enumerate(sorted(corpora["domain"].glob("*.txt"))[:9])]
    new_terms = tokenizer(" warranty", add_special_tokens=False)["input_ids"]
    doc = {"evaluation": {"suites": suites(root, texts, outputs)},
           "stops": [tokenizer.eos_token_id, stop], "newTerms": new_terms,
           "logitBudget": 2 * len(tokenizer), "klWindows": kl_windows(tokenizer, texts)}
    path = root / "case.json"
    path.write_text(json.dumps(doc))
    return path


def kl_windows(tokenizer: Any, texts: list[str]) -> list[dict[str, list[int]]]:
    """Five windows of 16 tokens: windows 0 and 3 all replay, window 4 half, the rest domain, so
    that on 2 and 4 ranks some ranks hold no replay token in any micro-batch."""
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    sources = [[1] * 16, [0] * 16, [0] * 16, [1] * 16, [0] * 8 + [1] * 8]
    return [{"ids": ids[16 * i:16 * (i + 1)], "sources": s} for i, s in enumerate(sources)]


@pytest.fixture(scope="module")
def alone(case, tiny_model_dir) -> dict[str, Any]:
    one = Dist(rank=0, world_size=1, local_rank=0, device=CPU)
    return check.evaluate(str(tiny_model_dir), json.loads(case.read_text()), Sharding.ddp, one)


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, case, tiny_model_dir, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Per strategy, every rank's report."""
    world = request.param
    out = tmp_path_factory.mktemp(f"eval-{world}-ranks")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", check.__file__, str(tiny_model_dir),
                           str(case), str(out)],
                          env=with_repo_path({**os.environ, "OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=300)
    written = sorted(p.name for p in out.iterdir())
    assert proc.returncode == 0, f"reports written: {written}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return {s: [json.loads((out / f"{s}-rank{r}.json").read_text()) for r in range(world)]
            for s in ("fsdp", "ddp")}


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key.endswith("kl_to_base"):
            assert got[key] == pytest.approx(value, abs=1e-6), key
        elif key.endswith(("perplexity", "nll", "bits_per_byte")):
            assert got[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert got[key] == value, key


def test_one_process_measures_every_suite(alone):
    results = alone["results"]
    assert all(math.isfinite(v) for v in results.values()), results
    assert {"new_terms.perplexity", "chat.kl_to_base", "format.format_follow", "sums.acc", "sums.acc_stderr",
            "echo.exact_match"} <= set(results)
    assert results["chat.kl_to_base"] > 0
    assert 0 < results["safety.refusal_rate"] < 1 and 0 < results["format.format_follow"] < 1
    assert results["programs.pass_at_1"] == 5 / 9  # the even samples' programs, each run in the sandbox
    assert results["sampled.pass_at_k"] == pytest.approx(5 / 9)  # every completion of those passes


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_every_rank_ends_with_the_one_process_results(ranks, alone, strategy):
    reports = ranks[strategy]
    first = reports[0]
    assert all(r["results"] == first["results"] for r in reports)
    assert all(r["generations"] == first["generations"] for r in reports)
    assert_close(first["results"], alone["results"])
    assert first["generations"] == alone["generations"]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_every_rank_holds_the_one_process_kl_term(ranks, alone, strategy):
    """Ranks whose micro-batches hold no replay token still enter a sharded reference's forward
    (else the others wait in its all-gather until the collective timeout)."""
    assert alone["kl"] > 0
    assert all(r["kl"] == pytest.approx(alone["kl"], rel=1e-5) for r in ranks[strategy])


def test_sharded_ranks_run_the_same_forwards_and_free_the_reference(ranks):
    reports = ranks["fsdp"]
    assert len({json.dumps(r["forwards"]) for r in reports}) == 1, [r["forwards"] for r in reports]
    assert all(r["reference_sharded"] for r in reports)
