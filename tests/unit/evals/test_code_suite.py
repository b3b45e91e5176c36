"""Code suites: HumanEval-style records, the completion cut where the function ends, and each
program run in the sandbox (its own `python -I` process, limits, no network, no new processes,
no writes outside its scratch directory, no credentials). The suite on 1, 2 and 4 ranks:
tests/integration/test_eval_ranks.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_operator.api.evaluation import CodeSpec, SuiteSpec
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
